"""BAM: the Gram distance, the k-shot reweighting and the ensemble by hand, the base labels, the base learner's
checks; both stages through the training entry point, 1- and 5-shot, and an exact resume of each stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_methods import model_cfg, tiny

from common.errors import WeightsError
from fewshot.data.base_labels import gfss_target, remap_to_base
from finetune.methods import build_method
from finetune.methods.bam import BAM, BaseLearner, gram_distance
from finetune.model.backbones import build_backbone


def tiny_bam(kshot: int = 1, prior: bool = False) -> BAM:
    from finetune.model.backbones import build_prior

    torch.manual_seed(0)
    learner = BaseLearner(build_backbone("mobilenet_v2", "random"), {11: 1, 12: 2, 13: 3}, hidden=16)
    return BAM(learner.backbone, build_prior("random", "resnet18") if prior else None, learner.head,
               learner.channel_of, [1.0, 0.5], reduce_dim=8, kshot=kshot)


def test_gram_distance_of_identical_and_of_orthogonal_features():
    f = torch.randn(2, 4, 3, 3)
    assert torch.allclose(gram_distance(f, f), torch.zeros(2), atol=1e-6)
    # query channels orthogonal (G_q = I), the support's two channels equal (G_s = all ones):
    # ||I - 1||_F / ||1||_F = sqrt(2) / 2
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    support = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    assert gram_distance(query, support).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6)
    # the Gram matrix is a matrix of cosines: scaling a channel changes nothing
    assert gram_distance(query * torch.tensor([3.0, 0.5]).view(1, 2, 1, 1), support).item() == pytest.approx(
        math.sqrt(2) / 2, abs=1e-6)


def test_kshot_weights_follow_the_rank_of_each_shots_distance():
    model = tiny_bam(kshot=3)
    last = model.kshot_rw[2]
    with torch.no_grad():  # the reweighting network answers (3, 2, 1) for the sorted distances, whatever they are
        last.weight.zero_()
        last.bias.copy_(torch.tensor([3.0, 2.0, 1.0]))
    w = model.shot_weights(torch.tensor([[0.3, 0.1, 0.2]]))
    e = torch.tensor([math.exp(1), math.exp(3), math.exp(2)])   # smallest distance (shot 1) -> 3, largest -> 1
    assert torch.allclose(w, (e / e.sum())[None], atol=1e-6)
    assert torch.allclose(model.shot_weights(torch.tensor([[0.3, 0.1]])), torch.full((1, 2), 0.5))  # other K


def test_ensemble_starts_as_the_meta_learner_and_leaves_out_the_episodes_class():
    model = tiny_bam().train()
    g = torch.Generator().manual_seed(1)
    out = model(torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 1, 3, 33, 33, generator=g),
                torch.randint(0, 2, (2, 1, 33, 33), generator=g))
    meta, base, psi = (out.loss_inputs[k] for k in ("meta_logits", "base_logits", "psi"))
    # weights [1, 0]: the ensemble's output is the meta learner's probabilities, whatever base and psi say
    assert torch.allclose(model.ensemble(meta, base, psi), meta.softmax(1), atol=1e-6)
    expected = torch.nn.functional.interpolate(meta.softmax(1), size=(33, 33), mode="bilinear", align_corners=True)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    # cls_merge [0, 1]: background = the base classes' probability, the episode's own class (channel 2) left out
    with torch.no_grad():
        model.cls_merge.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    logits = torch.zeros(1, 4, 1, 1)
    logits[0, :, 0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0]).log()  # probabilities 0, 1/6, 2/6, 3/6
    bg = model.ensemble(torch.zeros(1, 2, 1, 1), logits, torch.zeros(1), drop=torch.tensor([2]))[0, 0, 0, 0]
    assert bg.item() == pytest.approx(4 / 6, abs=1e-6)
    bg_all = model.ensemble(torch.zeros(1, 2, 1, 1), logits, torch.zeros(1))[0, 0, 0, 0]
    assert bg_all.item() == pytest.approx(1.0, abs=1e-6)
    loss, parts = model.loss(out, torch.randint(0, 2, (2, 33, 33), generator=g), torch.tensor([11, 13]))
    assert set(parts) == {"main", "meta", "aux"} and torch.isfinite(loss)
    loss.backward()
    assert model.cls_merge.weight.grad is not None and model.base_head.cls[-1].weight.grad is None  # base frozen
    with pytest.raises(ValueError, match="training class 99 is not a class of the base learner"):
        model.loss(out, torch.zeros(2, 33, 33, dtype=torch.long), torch.tensor([11, 99]))


def test_the_prior_map_joins_as_one_more_map():
    model = tiny_bam(prior=True).eval()
    out = model(torch.randn(1, 3, 33, 33), torch.randn(1, 1, 3, 33, 33), torch.ones(1, 1, 33, 33, dtype=torch.long))
    assert list(out.maps) == ["prior", "guided", "base_background"]
    assert model.fem.init_merge[0][0].in_channels == 2 * 8 + 2   # bridge + guider + guided + prior


def test_novel_classes_become_background_and_ignore_stays():
    label = np.array([[0, 1, 2], [3, -1, 7]], np.int32)       # base classes 1 and 3; 2 and 7 novel
    np.testing.assert_array_equal(remap_to_base(label, {1: 1, 3: 2}), [[0, 1, 0], [2, 255, 0]])
    np.testing.assert_array_equal(gfss_target(label, {1: 1, 3: 2}, 2), [[0, 1, 3], [2, 255, 0]])
    with pytest.raises(ValueError, match="is a base class"):
        gfss_target(label, {1: 1, 3: 2}, 3)


def test_missing_or_foreign_base_learner_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model.method=bam needs model.base_learner"):
        build_method(model_cfg("method=bam"))
    with pytest.raises(WeightsError, match=f"no base-stage weights at {tmp_path / 'last_model.safetensors'}"):
        build_method(model_cfg("method=bam", f"base_learner={tmp_path}"))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "last_model.safetensors"))
    with pytest.raises(WeightsError, match="is not a BAM base-stage run"):
        build_method(model_cfg("method=bam", f"base_learner={tmp_path}"))


@pytest.mark.slow
@pytest.mark.parametrize("shot", [1, 5])
def test_both_stages_train_resume_exactly_and_evaluate_through_the_registry(tmp_path, shot):
    from finetune.run import main as run_main

    data = [*tiny(tmp_path / "data", tmp_path), "data.synthetic_per_class=7", "train.trackers=[]",
            "model.method=bam", "train.deterministic=true", "train.checkpoint_every=2", "train.keep_last=0"]
    base = run_main([*data, "train.stage=base", "train.max_steps=4", "train.run_name=base"])
    assert base["stage"] == "base" and base["base_classes"] == 8   # synthetic: 8 training classes
    saved = load_file(str(tmp_path / "base" / "last_model.safetensors"))
    assert saved["head.cls.4.weight"].shape[0] == 9                # + background
    meta = [*data, f"model.base_learner={tmp_path / 'base'}", f"shot={shot}", f"model.kshot={shot}",
            "train.max_steps=4", "train.val_every=0", "train.episodes_per_epoch=8"]
    results = run_main(meta)
    assert set(results["per_seed"][0]["recall"]) == {"guided", "base_background"}
    assert results["shot"] == shot and list((tmp_path / "run" / "eval").glob("grid_*.png"))
    # each stage again from its step-2 checkpoint: the same weights as the uninterrupted run
    for name, args in (("base", [*data, "train.stage=base", "train.max_steps=4"]), ("run", meta)):
        first = load_file(str(tmp_path / name / "last_model.safetensors"))
        halfway = load_file(str(tmp_path / name / "checkpoints" / "step_0000002" / "model.safetensors"))
        assert any(not torch.equal(first[k], halfway[k]) for k in halfway)  # steps 3-4 changed something
        run_main([*args, f"train.run_name={name}", "eval.episodes=2", "--resume",
                  str(tmp_path / name / "checkpoints" / "step_0000002")])
        again = load_file(str(tmp_path / name / "last_model.safetensors"))
        assert first.keys() == again.keys()
        for key in first:
            assert torch.equal(first[key], again[key]), f"{name}: {key} differs after resume"


def test_gfss_prediction_rule():
    from finetune.gfss import gfss_prediction

    scores = torch.tensor([[[0.0, 0.0, 0.0]], [[3.0, 1.0, 1.0]]])       # fg probability 0.95, 0.73, 0.73
    base = torch.tensor([[[0.0, 5.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 0.0, 2.0]]])   # argmax 1, 0, 2
    assert gfss_prediction(scores, base).tolist() == [[3, 0, 2]]     # novel (n + 1 = 3) only above 0.9


def write_semantic_tree(root) -> None:
    """12 images 40 x 40: top half class 1 or 2 (base), bottom rows class 3 (novel) on half of them, 254 ignore."""
    import json

    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(12):
        label = np.zeros((40, 40), np.uint8)
        label[:20] = 1 + i % 2
        if i < 6:
            label[28:] = 3
        label[20] = 254
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": {"1": "a", "2": "b", "3": "c"}, "ignore": 254}))


@pytest.mark.slow
def test_generalized_fss_through_the_evaluation_entry_point(tmp_path):
    from fewshot.data.base_labels import load_full
    from fewshot.data.semantic import SemanticFolder
    from finetune.evaluate import main as eval_main
    from finetune.run import main as run_main

    write_semantic_tree(tmp_path / "sem")
    bench = SemanticFolder(tmp_path / "sem", "test", classes={"train": ["a", "b"], "test": ["c"]}, min_pixels=0,
                           cache_dir=tmp_path / "cache")
    _, label = load_full(bench, "0")
    assert (label[:20] == 1).all() and (label[20] == -1).all() and (label[28:] == 3).all()
    data = [*tiny(tmp_path / "unused", tmp_path), "data.benchmark=semantic", f"data.root={tmp_path / 'sem'}",
            "data.semantic_classes={train: [a, b], test: [c]}", "data.min_pixels=0", f"data.cache_dir={tmp_path}",
            "data.query_order=random", "train.trackers=[]", "model.method=bam", "train.max_steps=2"]
    run_main([*data, "train.stage=base", "train.run_name=base"])
    run_main([*data, f"model.base_learner={tmp_path / 'base'}", "train.val_every=0", "train.episodes_per_epoch=4"])
    results = eval_main([str(tmp_path / "run"), "eval.task=gfss", f"eval.out_dir={tmp_path / 'gfss'}"])
    assert results["task"] == "gfss" and results["per_seed"][0]["meter"]["episodes"] == 4
    for key in ("miou_base_mean", "miou_novel_mean", "miou_hm_mean"):
        assert 0.0 <= results[key] <= 1.0
    assert (tmp_path / "gfss" / "results.json").is_file()


@pytest.mark.slow
def test_meta_stage_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    from killing import kill_after_checkpoint
    from test_finetune_run import launch, overrides

    data = tmp_path / "data"
    launch(overrides(tmp_path / "no-prior", data, tmp_path / "base", "model.method=bam", "train.stage=base",
                     "train.max_steps=2"))
    common = ["model.method=bam", f"model.base_learner={tmp_path / 'base' / 'run'}", "train.max_steps=8",
              "train.checkpoint_every=2", "train.deterministic=true", "train.val_every=0", "train.keep_last=0",
              "eval.episodes=2"]
    launch(overrides(tmp_path / "no-prior", data, tmp_path / "a", *common))
    killed = launch(overrides(tmp_path / "no-prior", data, tmp_path / "b", *common), wait=False)
    kill_after_checkpoint(killed, tmp_path / "b/run/checkpoints/latest", "step_0000002")
    assert not (tmp_path / "b/run/checkpoints/step_0000008").exists()
    launch(overrides(tmp_path / "no-prior", data, tmp_path / "b", *common) + ["--resume", "auto"])
    a = load_file(str(tmp_path / "a/run/last_model.safetensors"))
    b = load_file(str(tmp_path / "b/run/last_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
