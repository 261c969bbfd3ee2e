"""FS-CS (iFSL): episodes, the inference rule, ER / mIoU, the objectives, and evaluations end to end (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from common.config import ConfigError, load_config
from fewshot.data.base import FewShotBenchmark, Sample, binary_mask
from fewshot.data.config import DataConfig
from fewshot.data.registry import build_benchmark
from fewshot.data.transforms import EvalTransform, TrainTransform
from fewshot.fscs import (
    FscsDataset,
    FscsEpisode,
    FscsMeter,
    FscsSpec,
    classify,
    draw_ways,
    evaluate_fscs,
    evaluate_fscs_seeds,
    fscs_collate,
    fscs_episodes_hash,
    fscs_table,
    index_presence,
    load_fscs_episodes,
    make_fscs_episodes,
    merge_ways,
    save_fscs_episodes,
    score_shard,
    segment,
)
from finetune.config import FinetuneConfig
from finetune.fscs import fscs_train_step, strong_loss, visible_presence, weak_loss
from finetune.methods import build_method

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "finetune" / "quickstart_cpu.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the CPUs are shared, and two contending threads run small convolutions 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(FewShotBenchmark):
    """An in-memory multi-class benchmark: 1-2 classes per image, class c a square of its own colour in a
    quadrant of a noisy grey image; the top row is ignore (255)."""

    name = "toy"
    COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 220), 4: (220, 220, 40), 5: (200, 40, 200),
               6: (40, 200, 200)}

    def __init__(self, n_images: int = 24, classes: tuple[int, ...] = (1, 2, 3, 4), size: int = 40, seed: int = 0,
                 most: int = 2) -> None:
        rng = np.random.default_rng(seed)
        self.split, self.class_ids = "test", list(classes)
        self.class_names = {c: f"c{c}" for c in classes}
        self.images, self.labels = {}, {}
        self.samples_by_class = {c: [] for c in classes}
        h = size // 2
        for i in range(n_images):
            key = f"img{i:03d}"
            image = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
            label = np.zeros((size, size), np.uint8)
            chosen = rng.choice(classes, int(rng.integers(1, most + 1)), replace=False)
            for j, c in enumerate(chosen):
                top, left = (j // 2) * h + 3, (j % 2) * h + 3
                label[top:top + h - 6, left:left + h - 6] = c
                image[top:top + h - 6, left:left + h - 6] = self.COLOURS[int(c)]
            label[0] = 255
            self.images[key], self.labels[key] = image, label
            for c in chosen:
                self.samples_by_class[int(c)].append(Sample(key, f"mem:{key}.jpg", f"mem:{key}.png"))

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[sample.key], binary_mask(self.labels[sample.key], class_id)


def prototype():
    cfg = load_config(FinetuneConfig, None, ["model.method=prototype", "model.backbone=mobilenet_v2",
                                             "model.backbone_weights=random", "model.prototype_layer=layer2"])
    torch.manual_seed(0)
    return build_method(cfg.model).eval()


# --------------------------------------------------------------------------------------------------
# the inference rule on hand-made probability maps


def test_presence_and_merged_segmentation_by_hand():
    fg = torch.tensor([[[[0.9, 0.2], [0.1, 0.3]],        # way 1: max 0.9 -> present
                        [[0.1, 0.4], [0.45, 0.2]]]])     # way 2: max 0.45 -> absent
    probs = torch.stack([1 - fg, fg], dim=2)                                   # [1,2,2,2,2]
    scores, present = classify(fg)
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.45]]))
    assert present.tolist() == [[True, False]]
    merged = merge_ways(probs)
    # background = mean of the ways' background probabilities: (0.1 + 0.9) / 2, (0.8 + 0.6) / 2, ...
    torch.testing.assert_close(merged[0, 0], torch.tensor([[0.5, 0.7], [0.725, 0.75]]))
    assert segment(merged, present)[0].tolist() == [[1, 0], [0, 0]]
    # a pixel won by a class called absent becomes background (a hand-made merged map, not from one model)
    merged = torch.tensor([[[[0.1]], [[0.2]], [[0.7]]]])                      # [1,1+2,1,1]: way 2 wins
    assert segment(merged, torch.tensor([[True, False]])).item() == 0
    assert segment(merged, torch.tensor([[True, True]])).item() == 2


def test_the_image_region_alone_decides_presence():
    fg = torch.zeros(1, 1, 4, 4)
    fg[0, 0, 3, 3] = 0.9                                                      # only in the canvas padding
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[:, :3, :3] = True
    assert classify(fg)[1].item() and not classify(fg, valid)[1].item()


def test_with_averaged_probabilities_only_a_present_class_can_win_a_pixel():
    """mean_n P_bg^n = 1 - mean_n P_fg^n, so a winning class has P_fg > 1/2 there: the drop rule is a no-op
    on the image region (it matters for the canvas padding and for other merges)."""
    torch.manual_seed(0)
    probs = torch.rand(8, 3, 2, 9, 9).softmax(dim=2)
    merged = merge_ways(probs)
    present = classify(probs[:, :, 1])[1]
    assert torch.equal(segment(merged, present), merged.argmax(1))


# --------------------------------------------------------------------------------------------------
# metrics


def test_er_and_miou_on_hand_counted_episodes():
    meter = FscsMeter([1, 2, 3])
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 2, 255]])
    # episode 1: ways (1, 2), both present and both called present, prediction covers class 1 exactly
    r = meter.update(torch.tensor([[1, 1, 0, 0], [0, 0, 0, 2]]), target, [1, 2],
                     torch.tensor([True, True]), torch.tensor([True, True]))
    assert r["exact"] and r["iou"][0] == 1.0 and r["iou"][1] == 0.0
    # episode 2: ways (3, 1): 3 absent and called present (wrong), 1 present and called present
    meter.update(torch.tensor([[2, 2, 1, 0], [0, 0, 0, 0]]), torch.tensor([[2, 2, 0, 0], [0, 0, 0, 0]]),
                 [3, 1], torch.tensor([True, True]), torch.tensor([False, True]))
    # episode 3: 1-way, class 3 absent, called absent, nothing predicted
    meter.update(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), [3],
                 torch.tensor([False]), torch.tensor([False]))
    # episode 4: 1-way, class 2 present, called absent
    meter.update(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[2, 0, 0, 0], [0, 0, 0, 0]]).clamp(max=1),
                 [2], torch.tensor([False]), torch.tensor([True]))
    s = meter.summary()
    assert s["episodes"] == 4 and s["er"] == pytest.approx(2 / 4)
    assert s["way_accuracy"] == pytest.approx(4 / 6) and s["positive_rate"] == pytest.approx(4 / 6)
    # class 1: ep1 I=2 U=2, ep2 (way 2 -> label 2) I=2 U=2 -> 1.0; class 2: ep1 I=0 U=1 (the 255 pixel does
    # not count), ep4 I=0 U=1 -> 0; class 3: ep2 (label 1) I=0 U=1, ep3 empty -> 0
    assert s["per_class_iou"] == {"1": 1.0, "2": 0.0, "3": 0.0}
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["episodes_per_class"] == {"1": 2, "2": 2, "3": 2}
    # the state sums across "processes"
    twice = FscsMeter([1, 2, 3]).load_state(torch.stack([meter.state(), meter.state()]))
    assert twice.summary()["er"] == s["er"] and twice.cls[0] == 8


def test_a_class_never_present_nor_predicted_has_no_iou():
    meter = FscsMeter([1, 2])
    meter.update(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long), [1], torch.tensor([True]),
                 torch.tensor([True]))
    meter.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), [2],
                 torch.tensor([False]), torch.tensor([False]))
    assert meter.per_class_iou() == {1: 1.0} and meter.miou() == 1.0


# --------------------------------------------------------------------------------------------------
# episodes


def test_per_way_negative_rate_is_one_half():
    bench = Toy(n_images=60, classes=(1, 2, 3, 4, 5, 6), most=3)
    one = make_fscs_episodes(bench, 1, 1, 2000, seed=7)
    negatives = sum(not p for row in index_presence(bench, one) for p in row)
    assert negatives == 959                                   # exact for this seed (pinned)
    assert abs(negatives / 2000 - 0.5) < 0.03                  # about 1/2 by construction
    two = make_fscs_episodes(bench, 2, 1, 2000, seed=7)
    rates = np.mean([[not p for p in row] for row in index_presence(bench, two)], axis=0)
    assert np.all(np.abs(rates - 0.5) < 0.05), rates           # per way, with 1-3 classes per image
    none = sum(not any(row) for row in index_presence(bench, two)) / 2000
    assert 0.15 < none < 0.35                                  # queries with none of the support classes


def test_episodes_are_a_pure_function_and_well_formed(tmp_path):
    bench = Toy()
    for order in ("random", "cycle", "shuffle"):
        a = make_fscs_episodes(bench, 2, 2, 30, seed=3, query_order=order)
        assert a == make_fscs_episodes(Toy(), 2, 2, 30, seed=3, query_order=order)
        assert a != make_fscs_episodes(bench, 2, 2, 30, seed=4, query_order=order)
        for e in a:
            assert len(set(e.class_ids)) == 2 and all(len(s) == 2 for s in e.supports)
            for c, keys in zip(e.class_ids, e.supports):
                assert e.query not in keys and len(set(keys)) == 2
                assert all(k in {s.key for s in bench.samples_by_class[c]} for k in keys)
    assert len(make_fscs_episodes(bench, 1, 1, 0, 0, "cycle")) == len(bench.image_keys())
    path = tmp_path / "episodes.json"
    digest = save_fscs_episodes(a, path, {"way": 2})
    assert digest == fscs_episodes_hash(a) and load_fscs_episodes(path) == a
    body = json.loads(path.read_text())
    body["episodes"][0][2] = [9, 9]
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="content hash"):
        load_fscs_episodes(path)
    with pytest.raises(ValueError, match="need 5 classes"):
        make_fscs_episodes(bench, 5, 1, 3, 0)


def test_reference_rule_weights_the_query_class_one_half():
    import random

    rng = random.Random(0)
    hits = sum(draw_ways(rng, [1], [2, 3, 4, 5], 1, "ifsl", anchor=1) == [1] for _ in range(4000))
    assert abs(hits / 4000 - 0.5) < 0.03
    # 2 of 5 without replacement: the anchor is among them with probability 1/2 + 1/2 * (1/2) / (7/8) = 11/14
    both = [draw_ways(rng, [1], [2, 3, 4, 5], 2, "ifsl", anchor=1) for _ in range(4000)]
    assert abs(sum(1 in w for w in both) / 4000 - 11 / 14) < 0.03 and all(len(set(w)) == 2 for w in both)
    bench = Toy()
    ref = make_fscs_episodes(bench, 2, 1, 50, 0, "cycle", rule="ifsl")
    assert ref != make_fscs_episodes(bench, 2, 1, 50, 0, "cycle") and len(ref) == 50


def test_several_sources_draw_within_a_source():
    from fewshot.data.sources import MultiSource

    bench = MultiSource([("a", 0.0, Toy()), ("b", 0.0, Toy(n_images=12, classes=(5,), seed=1, most=1))], "test")
    one = make_fscs_episodes(bench, 1, 1, 40, seed=0)
    assert {e.query.split("::")[0] for e in one} == {"a", "b"}
    for e in one:
        source = e.query.split("::")[0]
        assert all(k.startswith(source + "::") for s in e.supports for k in s)
        assert all(c // 1000 == (1 if source == "a" else 2) for c in e.class_ids)
    item = FscsDataset(bench, one, EvalTransform(33, "hsnet"), 1, 1)[0]
    assert item["presence"].tolist() == index_presence(bench, one[:1])[0]
    with pytest.warns(UserWarning, match="sources b have fewer than 2 classes"):
        two = make_fscs_episodes(bench, 2, 1, 20, seed=0)
    assert len(two) == 20 and all(e.query.startswith("a::") for e in two)


# --------------------------------------------------------------------------------------------------
# episodes as tensors


def test_query_label_presence_and_absent_classes():
    bench = Toy()
    key = next(k for k, lab in bench.labels.items() if len(set(np.unique(lab)) - {0, 255}) == 2)
    there = sorted(set(np.unique(bench.labels[key]).tolist()) - {0, 255})
    absent = next(c for c in bench.class_ids if c not in there)
    supports = tuple((bench.samples_by_class[c][0].key if bench.samples_by_class[c][0].key != key
                      else bench.samples_by_class[c][1].key,) for c in (absent, there[1]))
    episode = FscsEpisode(key, supports, (absent, there[1]))
    item = FscsDataset(bench, [episode], EvalTransform(33, "hsnet"), 2, 1)[0]
    orig = item["query_label_orig"].numpy()
    assert item["presence"].tolist() == [False, True]
    assert (orig == 2).sum() == (bench.labels[key] == there[1]).sum() and not (orig == 1).any()
    assert (orig[0] == 255).all() and (orig[bench.labels[key] == there[0]] == 0).all()   # not a way: background
    assert item["supports"].shape == (2, 1, 3, 33, 33) and item["support_masks"].shape == (2, 1, 33, 33)
    assert item["content"].tolist() == [33, 33] and item["query_label"].max() == 255
    assert index_presence(bench, [episode]) == [item["presence"].tolist()]


def test_items_do_not_depend_on_the_number_of_workers():
    bench = Toy()
    episodes = make_fscs_episodes(bench, 2, 1, 6, seed=1)
    dataset = FscsDataset(bench, episodes, TrainTransform(33, long_side=33), 2, 1, seed=5, epoch=2)
    runs = [list(DataLoader(dataset, batch_size=3, num_workers=w, collate_fn=fscs_collate)) for w in (0, 2)]
    for a, b in zip(*runs):
        for name in ("query", "query_label", "supports", "support_masks", "class_ids", "presence"):
            assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------------------------------
# objectives


def test_strong_and_weak_objectives_by_hand():
    logits = torch.randn(2, 1, 2, 5, 5)
    target = torch.randint(0, 2, (2, 5, 5))
    target[0, 0, 0] = 255
    # one way: the merged NLL is the method's two-class cross-entropy
    torch.testing.assert_close(strong_loss(logits, target), F.cross_entropy(logits[:, 0], target, ignore_index=255))
    # two ways at one pixel: P_fg = (0.8, 0.3) -> merged (mean(0.2, 0.7), 0.8, 0.3) = (0.45, 0.8, 0.3)
    fg = torch.tensor([0.8, 0.3])
    two = torch.stack([torch.log(1 - fg), torch.log(fg)], dim=1).view(1, 2, 2, 1, 1)   # log-probs as logits
    for label, p in ((0, 0.45), (1, 0.8), (2, 0.3)):
        assert strong_loss(two, torch.tensor([[[label]]])).item() == pytest.approx(-np.log(p), rel=1e-5)
    # weak: mean foreground probability over the pixels against the tag
    fg_map = torch.tensor([[0.9, 0.1], [0.1, 0.1]])                            # mean 0.3
    weak = torch.stack([torch.log(1 - fg_map), torch.log(fg_map)]).view(1, 1, 2, 2, 2)
    assert weak_loss(weak, torch.tensor([[True]])).item() == pytest.approx(-np.log(0.3), rel=1e-5)
    assert weak_loss(weak, torch.tensor([[False]])).item() == pytest.approx(-np.log(0.7), rel=1e-5)
    label = torch.tensor([[[0, 2], [255, 0]]])
    assert visible_presence(label, 2).tolist() == [[False, True]]


@pytest.mark.parametrize("labels", ["strong", "weak"])
def test_a_training_step_reaches_the_head(labels):
    cfg = load_config(FinetuneConfig, None, ["model.method=pfenet", "model.backbone=mobilenet_v2",
                                             "model.backbone_weights=random", "model.reduce_dim=8",
                                             "model.bins=[1.0,0.5]"])
    torch.manual_seed(0)
    model = build_method(cfg.model).train()
    bench = Toy()
    episodes = make_fscs_episodes(bench, 2, 1, 2, seed=0)
    batch = fscs_collate([FscsDataset(bench, episodes, TrainTransform(33, long_side=33), 2, 1)[i] for i in (0, 1)])
    loss, parts = fscs_train_step(model, batch, labels)
    loss.backward()
    assert torch.isfinite(loss) and f"{labels}_nll" in parts
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


# --------------------------------------------------------------------------------------------------
# evaluation


def test_sharded_scores_equal_one_process():
    """The logic of sharding (rank::world shards, meters summed) gives the one-process numbers exactly."""
    bench, model, accelerator = Toy(), prototype(), Accelerator(cpu=True)
    spec = FscsSpec(shot=1, episodes=8, protocol="pfenet", size=33, query_order="random", way=2)
    episodes = make_fscs_episodes(bench, 2, 1, 8, seed=0)
    dataset = FscsDataset(bench, episodes, EvalTransform(33, "pfenet"), 2, 1)
    with torch.no_grad():
        whole = score_shard(model, dataset, list(range(8)), spec, accelerator)[0]
        parts = [score_shard(model, dataset, list(range(r, 8, 2)), spec, accelerator)[0] for r in (0, 1)]
    merged = FscsMeter(bench.class_ids).load_state(torch.stack([p.state() for p in parts]))
    assert torch.equal(merged.state(), whole.state()) and whole.summary()["episodes"] == 8


def test_prototype_fscs_evaluation_end_to_end(tmp_path):
    bench, model, accelerator = Toy(), prototype(), Accelerator(cpu=True)
    spec = FscsSpec(shot=1, episodes=10, protocol="pfenet", size=33, query_order="random", way=2)
    results = evaluate_fscs_seeds(model, bench, spec, [0, 1], accelerator, tmp_path,
                                  {"method": "prototype", "benchmark": "toy", "fold": "0", "checkpoint": "none"},
                                  vis_episodes=2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["er_mean"] == results["er_mean"] and saved["task"] == "fscs" and saved["way"] == 2
    assert len(saved["per_seed"]) == 2
    assert 0 <= saved["er_mean"] <= 1 and 0 <= saved["miou_mean"] <= 1 and saved["per_seed"][0]["episodes"] == 10
    episodes = load_fscs_episodes(tmp_path / "fscs_episodes_2way1shot_seed0.json")
    assert fscs_episodes_hash(episodes) == saved["per_seed"][0]["episodes_hash"]
    assert (tmp_path / "fscs_grid_2way1shot_seed0_rank0.png").is_file()
    assert (tmp_path / "results.md").read_text().startswith("# `prototype` on toy fold 0, FS-CS 2-way 1-shot")
    again = evaluate_fscs(model, bench, spec, 0, accelerator, episodes=episodes)
    assert again["meter"]["er"] == saved["per_seed"][0]["meter"]["er"]
    assert "prototype | 2-way 1-shot" in fscs_table([saved])


def test_prototype_fscs_through_finetune_evaluate(tmp_path):
    """``python -m finetune.evaluate ... eval.task=fscs`` dispatches to FS-CS (a single-label FSS layout)."""
    from finetune.evaluate import main

    results = main(["--config", str(QUICKSTART), *tiny(tmp_path), "model.method=prototype", "eval.task=fscs",
                    "eval.way=2", f"eval.out_dir={tmp_path / 'proto'}"])
    assert results["task"] == "fscs" and results["way"] == 2 and results["per_seed"][0]["episodes"] == 4
    assert 0 <= results["positive_rate_mean"] <= 1
    assert list((tmp_path / "proto").glob("fscs_episodes_2way1shot_seed0.json"))


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.root={tmp_path / 'data'}", "data.synthetic_per_class=4", "data.synthetic_size=48",
            "data.train_size=33", "data.eval_size=33", "data.num_workers=0", "model.reduce_dim=8",
            "model.backbone=mobilenet_v2", "model.backbone_weights=random", "model.bins=[1.0,0.5]",
            "model.prior=none", "train.batch_size=2", "train.log_every=1", "train.val_episodes=2",
            f"train.out_dir={tmp_path}", "train.run_name=run", "train.trackers=[]", "eval.episodes=4",
            "eval.seeds=[0]", "eval.vis_episodes=2", "eval.num_workers=0", *extra]


@pytest.mark.parametrize("labels", ["strong", "weak"])
def test_trained_method_fscs_run_end_to_end(tmp_path, labels):
    """finetune/run.py in-process: 2 FS-CS training steps of pfenet, FS-CS validation, 2-way FS-CS test."""
    from finetune.run import main

    results = main(tiny(tmp_path, "model.method=pfenet", "train.task=fscs", f"train.labels={labels}",
                        "train.max_steps=2", "train.val_every=1", "train.episodes_per_epoch=4", "eval.task=fscs",
                        "eval.way=2", "eval.compare_with=[]"))
    assert results["task"] == "fscs" and results["method"] == "pfenet" and results["way"] == 2
    assert results["checkpoint"].endswith("best_model.safetensors")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(f"loss/{labels}_nll" in row for row in logged) and any("val/er" in row for row in logged)


def test_fscs_config_keys_are_validated():
    with pytest.raises(ConfigError, match="eval.way=2 must be >= 1, and 1 unless eval.task=fscs"):
        load_config(FinetuneConfig, None, ["eval.way=2"])
    with pytest.raises(ConfigError, match="train.labels=weak needs train.task=fscs"):
        load_config(FinetuneConfig, None, ["train.labels=weak"])
    for name in ("fscs_pascal5i_1way", "fscs_pascal5i_2way", "fscs_coco20i_1way", "fscs_coco20i_2way",
                 "fscs_smoke_real_mnv2"):
        cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / f"{name}.yaml")
        assert cfg.eval.task == "fscs" and cfg.train.task == "fscs" and cfg.eval.way == (2 if "2way" in name else
                                                                                           2 if "smoke" in name else 1)


# --------------------------------------------------------------------------------------------------
# real multi-class data


def test_real_semantic_labels_agree_with_the_index(shared_data):
    cfg = DataConfig(benchmark="semantic", root=str(shared_data / "semantic" / "coco128"), semantic_folds=4, fold=0)
    with pytest.warns(UserWarning):
        bench = build_benchmark(cfg, "test")
    episodes = make_fscs_episodes(bench, 2, 1, 40, seed=0)
    dataset = FscsDataset(bench, episodes, EvalTransform(65, "hsnet"), 2, 1)
    truth = [dataset[i]["presence"].tolist() for i in range(len(episodes))]
    assert truth == index_presence(bench, episodes)
    assert 0.2 < np.mean([not p for row in truth for p in row]) < 0.8
