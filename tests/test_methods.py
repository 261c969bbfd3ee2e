"""The method registry, the training-free prototype baseline, and both stage-2 entry points in-process (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from common.config import ConfigError, load_config
from common.errors import WeightsError
from finetune.config import FinetuneConfig
from finetune.methods import METHODS, FewShotMethod, build_method, register
from finetune.methods.prototype import PrototypeBaseline, masked_average, prototype_logits
from finetune.model.config import ModelConfig


def model_cfg(*overrides: str) -> ModelConfig:
    base = ["model.backbone=mobilenet_v2", "model.backbone_weights=random", "model.prior=random",
            "model.prior_arch=resnet18", "model.reduce_dim=16", "model.bins=[1.0,0.5]"]
    return load_config(FinetuneConfig, None, base + [f"model.{o}" for o in overrides]).model


def test_unknown_method_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"model.method='panet' is not registered; choose one of .*prototype"):
        load_config(FinetuneConfig, None, ["model.method=panet"])


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register("qgnet")(lambda cfg: None)


def test_pfenet_is_qgnet_without_the_prior():
    torch.manual_seed(0)
    pfenet, qgnet = build_method(model_cfg("method=pfenet")), build_method(model_cfg())
    assert pfenet.prior is None and qgnet.prior is not None
    out = pfenet(torch.randn(1, 3, 33, 33), torch.randn(1, 1, 3, 33, 33), torch.ones(1, 1, 33, 33).long())
    assert list(out.maps) == ["guided"] and out.logits.shape == (1, 2, 33, 33)


def test_masked_average_and_logits_by_hand():
    feats = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])                      # [1,1,2,2]
    weights = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert masked_average(feats, weights, eps=0).item() == pytest.approx(3.0)
    query = torch.tensor([[[[1.0]], [[0.0]]]])                                # [1,2,1,1]: the unit x vector
    fg, bg = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])          # cos 1 and cos 1/sqrt(2)
    logits = prototype_logits(query, fg, bg, scale=10.0)
    torch.testing.assert_close(logits.flatten(), torch.tensor([10 / 2 ** 0.5, 10.0]))


class _Constant(torch.nn.Module):
    """A fake trunk whose taps are the input's first channels, so prototypes are hand-checkable."""

    def forward(self, x):
        return x[:, :1], x[:, :2], x[:, :3]


def test_prototype_segments_by_nearest_prototype_and_averages_shots():
    model = PrototypeBaseline(_Constant(), layer="layer3", scale=1.0)
    fg, bg = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    support = torch.zeros(1, 2, 3, 9, 9)
    support[..., :, :, :] = bg.view(1, 1, 3, 1, 1)
    support[..., :, :4, :] = fg.view(1, 1, 3, 1, 1)                           # top rows are the object
    masks = torch.zeros(1, 2, 9, 9, dtype=torch.long)
    masks[:, :, :4] = 1
    masks[:, 1, 8] = 255                                                       # ignored pixels count nowhere
    query = bg.view(1, 3, 1, 1).expand(1, 3, 9, 9).clone()
    query[0, :, :, 5:] = fg.view(3, 1, 1)
    out = model(query, support, masks)
    pred = out.logits.argmax(1)[0]
    assert pred[:, 6:].eq(1).all() and pred[:, :4].eq(0).all()
    assert not model.trains and out.maps["similarity"].shape == (1, 1, 9, 9)
    with pytest.raises(NotImplementedError, match="training-free"):
        model.loss(out, masks[:, 0])


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4", "layer3+layer4"])
def test_prototype_on_a_real_backbone_every_layer(layer):
    model = build_method(model_cfg("method=prototype", f"prototype_layer={layer}"))
    assert isinstance(model, FewShotMethod) and not model.trainable_parameters()
    out = model(torch.randn(2, 3, 33, 33), torch.randn(2, 3, 3, 33, 33), torch.randint(0, 2, (2, 3, 33, 33)))
    assert out.logits.shape == (2, 2, 33, 33) and 0 <= out.maps["similarity"].min() <= 1


def test_registry_lists_every_method():
    assert {"qgnet", "pfenet", "prototype"} <= set(METHODS)


# --------------------------------------------------------------------------------------------------
# entry points, in-process (the launcher runs are in test_finetune_run.py, marked slow)


def tiny(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data_root}", "data.synthetic_per_class=4", "data.synthetic_size=48",
            "data.train_size=33", "data.eval_size=33", "data.num_workers=0", "model.reduce_dim=8",
            "model.backbone=mobilenet_v2", "model.backbone_weights=random", "model.bins=[1.0,0.5]",
            "train.batch_size=2",
            "train.log_every=1", "train.val_episodes=2", f"train.out_dir={out}", "train.run_name=run",
            "eval.episodes=4", "eval.seeds=[0]", "eval.vis_episodes=2", "eval.num_workers=0", *extra]


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    path = tmp_path_factory.mktemp("prior") / "prior_resnet18.safetensors"
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    save_file(state, str(path), metadata={"arch": "resnet18"})
    return path


def test_prototype_evaluates_without_a_run_folder(tmp_path):
    from finetune.evaluate import main

    results = main(["--config", str(Path(__file__).parents[1] / "configs/finetune/quickstart_cpu.yaml"),
                    *tiny(tmp_path / "data", tmp_path / "runs"), "model.method=prototype",
                    f"eval.out_dir={tmp_path / 'proto'}"])
    assert results["method"] == "prototype" and results["checkpoint"] == "none (training-free)"
    saved = json.loads((tmp_path / "proto/results.json").read_text())
    assert saved["per_seed"][0]["meter"]["episodes"] == 4 and 0 <= saved["miou_mean"] <= 1
    assert (tmp_path / "proto/results.md").read_text().startswith("# `prototype` on synthetic")


def test_a_learned_method_without_weights_is_refused(tmp_path):
    from finetune.evaluate import main

    with pytest.raises(WeightsError, match="has trained parameters: give a run folder"):
        main([*tiny(tmp_path / "data", tmp_path / "runs"), "model.prior=none"])


def test_run_trains_then_evaluates_and_weights_file_keeps_its_run_config(prior, tmp_path):
    """finetune/run.py in-process (2 steps), then finetune.evaluate on the weights *file*: its run's config wins."""
    from finetune.evaluate import main as evaluate_main
    from finetune.run import main as run_main

    results = run_main(tiny(tmp_path / "data", tmp_path, f"model.prior={prior}", "train.max_steps=2",
                            "train.val_every=1", "train.episodes_per_epoch=4"))
    run = tmp_path / "run"
    assert results["method"] == "qgnet" and (run / "last_model.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]
    again = evaluate_main([results["checkpoint"], f"eval.out_dir={tmp_path / 'again'}"])  # a file in the run
    assert again["per_seed"][0]["episodes_hash"] == results["per_seed"][0]["episodes_hash"]
    assert again["per_seed"][0]["meter"] == results["per_seed"][0]["meter"]


def test_run_with_a_training_free_method_only_evaluates(tmp_path):
    from finetune.run import main as run_main

    results = run_main(tiny(tmp_path / "data", tmp_path, "model.method=prototype"))
    assert results["method"] == "prototype" and not (tmp_path / "run" / "checkpoints").exists()


def test_balanced_cross_entropy_by_hand():
    import math

    from finetune.methods.qgnet import balanced_cross_entropy

    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, 0] = math.log(3)                    # pixel 0: foreground probability 0.75
    target = torch.tensor([[[1, 0, 0, 255]]])           # one foreground, two background, one ignored pixel
    expected = 0.5 * (-math.log(0.75) - math.log(0.5))  # mean of the foreground CE and the background CE
    assert balanced_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    only_bg = torch.tensor([[[0, 0, 0, 255]]])          # an absent class contributes nothing: the bg mean alone
    bg_mean = (-math.log(0.25) - 2 * math.log(0.5)) / 3
    assert balanced_cross_entropy(logits, only_bg).item() == pytest.approx(bg_mean, rel=1e-6)


@pytest.mark.parametrize("residual", ["prototype", "ssp"])
def test_residual_starts_exactly_as_the_training_free_method(residual):
    from finetune.methods.ssp import SSP

    torch.manual_seed(0)
    qgnet = build_method(model_cfg("method=pfenet", f"extra_maps=[{residual}]", f"residual={residual}",
                                   "freeze_bn_stats=true")).eval()
    trunk = qgnet.backbone  # the same frozen trunk
    baseline = (PrototypeBaseline(trunk, "layer3", 20.0) if residual == "prototype" else SSP(trunk, "layer3")).eval()
    g = torch.Generator().manual_seed(2)
    query, supports = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 2, 3, 33, 33, generator=g)
    masks = (torch.rand(2, 2, 33, 33, generator=g) > 0.5).long()
    with torch.no_grad():
        ours, ref = qgnet(query, supports, masks), baseline(query, supports, masks)
    torch.testing.assert_close(ours.logits, ref.logits)
    extra = {"prototype"} if residual == "prototype" else {"ssp_fg", "ssp_bg"}
    assert set(ours.maps) == {"guided", *extra}
    for name in extra - {"prototype"}:  # SSP's maps are min-max normalised per episode
        flat = ours.maps[name].flatten(1)
        torch.testing.assert_close(flat.min(1).values, torch.zeros(2))
        torch.testing.assert_close(flat.max(1).values, torch.ones(2), atol=1e-5, rtol=0)
