"""The superpixel kNN prior probe: labelling, pooling and scoring by hand, end to end, and on real weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file

from fewshot.data.episodes import make_episodes
from fewshot.data.fss import Fss1000
from fewshot.metrics import SegmentationMeter
from pretrain.probe import (
    ProbeConfig,
    ProbeImages,
    evaluate_prior,
    knn_vote,
    load_prior,
    main,
    random_prior,
    superpixel_embeddings,
    support_foreground,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def unit(rows: list[list[float]]) -> np.ndarray:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1).numpy()


def test_knn_vote_two_clusters() -> None:
    # foreground cluster around +x, background cluster around +y
    support = unit([[1, 0.1], [1, -0.1], [1, 0.05], [0.1, 1], [-0.1, 1], [0.05, 1]])
    support_fg = np.array([True, True, True, False, False, False])
    query = unit([[1, 0.02], [0.02, 1], [0.9, 0.3], [-0.2, 1]])
    assert knn_vote(support, support_fg, query, neighbors=3).tolist() == [True, False, True, False]
    # k = 1 follows the single nearest support row
    assert knn_vote(support, support_fg, query, neighbors=1).tolist() == [True, False, True, False]


def test_knn_vote_ties_are_background_and_k_is_clipped() -> None:
    support = unit([[1, 0], [0, 1]])
    query = unit([[1, 0.01]])
    # 2 neighbours, one of each label: a tie, so background
    assert knn_vote(support, np.array([True, False]), query, neighbors=2).tolist() == [False]
    # k = 5 > 2 support rows is clipped to 2; both foreground
    assert knn_vote(support, np.array([True, True]), query, neighbors=5).tolist() == [True]


def test_support_foreground_majority_ignores_255() -> None:
    labels = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 3, 3]])
    mask = np.array([[1, 1, 1, 0],
                     [1, 0, 0, 0],
                     [1, 255, 255, 255]], dtype=np.uint8)
    # id 0: 3 of 4 fg; id 1: 1 of 4 (minority); id 2: 1 of 1 counted; id 3: nothing counted
    assert support_foreground(labels, mask).tolist() == [True, False, True, False]


def test_superpixel_embeddings_equal_nearest_upsampling() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5, 3, 3, generator=gen)
    labels = torch.randint(0, 4, (12, 12), generator=gen)
    labels[0, 0], labels[11, 11] = 0, 3  # every id 0..3 present (dense)
    labels = torch.unique(labels, return_inverse=True)[1]
    up = F.interpolate(features[None], size=(12, 12), mode="nearest")[0]  # [5,12,12]
    expected = torch.stack([up[:, labels == i].mean(dim=1) for i in range(int(labels.max()) + 1)])
    got = superpixel_embeddings(features, labels)
    assert got.shape == (int(labels.max()) + 1, 5)
    torch.testing.assert_close(got, F.normalize(expected, dim=1), rtol=1e-5, atol=1e-6)


def test_iou_is_accumulated_per_class_then_averaged() -> None:
    """The probe scores with class-accumulated IoU, not a mean of episode IoUs."""
    meter = SegmentationMeter([1, 2])
    # class 1, episode a: pred covers 2 of 4 gt pixels and nothing else -> I=2, U=4
    gt_a = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.uint8)
    pred_a = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    # class 1, episode b: perfect on 3 pixels, one ignored pixel predicted fg -> I=3, U=3
    gt_b = np.array([[1, 1, 1, 255], [0, 0, 0, 0]], dtype=np.uint8)
    pred_b = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.uint8)
    # class 2: misses its 1 pixel and predicts 1 wrong one -> I=0, U=2
    gt_c = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    pred_c = np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    for pred, gt, c in ((pred_a, gt_a, 1), (pred_b, gt_b, 1), (pred_c, gt_c, 2)):
        meter.update(pred, gt, c)
    assert meter.per_class_iou()[1] == pytest.approx(5 / 7)  # not (0.5 + 1) / 2
    assert meter.miou() == pytest.approx((5 / 7 + 0) / 2)
    # background: a: I=4 U=6; b: I=4 U=4; c: I=6 U=8 -> 14/18; foreground over all: I=5 U=9
    assert meter.fbiou() == pytest.approx((14 / 18 + 5 / 9) / 2)


# --------------------------------------------------------------------------------------------------
# end to end on a tiny FSS-layout tree


def write_fss_tree(root: Path, classes: int = 2, per_class: int = 3, size: int = 48) -> Path:
    """Class k: a bright disc (k=0) or square (k=1) on noise; the mask is the shape (0/255 PNG)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for n in range(1, per_class + 1):
            cy, cx, r = rng.integers(16, 32, size=2).tolist() + [int(rng.integers(8, 13))]
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if k == 0 else \
                ((abs(yy - cy) < r) & (abs(xx - cx) < r))
            image = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
            image[shape] = (230, 60 + 100 * k, 40)
            Image.fromarray(image).save(folder / f"{n}.jpg", quality=95)
            Image.fromarray((shape * 255).astype(np.uint8)).save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    torch.manual_seed(1)  # not the probe's random-init comparison network (seed 0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("export") / "prior_resnet18.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "arch": "resnet18"})
    return path


def test_probe_end_to_end_is_deterministic(tmp_path: Path, tiny_export: Path, capsys) -> None:
    data = write_fss_tree(tmp_path / "fss")
    args = [str(tiny_export), "--data", str(data), "--episodes", "6", "--size", "64", "--n-segments", "24",
            "--neighbors", "1"]
    reports = []
    for run in ("a", "b"):
        assert main(args + ["--out", str(tmp_path / f"{run}.json")]) == 0
        reports.append(json.loads((tmp_path / f"{run}.json").read_text()))
    assert reports[0] == reports[1]
    report = reports[0]
    assert report["arch"] == "resnet18" and report["episodes"] == 6
    assert set(report["results"]) == {"export (resnet18)", "random init (resnet18)"}
    for scores in report["results"].values():
        assert 0.0 < scores["miou"] <= 1.0 and math.isfinite(scores["miou"])
        assert 0.0 < scores["fb_iou"] <= 1.0
        assert set(scores["per_class"]) == {"class0", "class1"}
    table = capsys.readouterr().out
    assert "| **mIoU** |" in table and "| class0 |" in table


def test_probe_needs_an_arch(tmp_path: Path) -> None:
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "no_meta.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="no_meta.safetensors.*pass --arch"):
        load_prior(path)
    net, arch = load_prior(path, "resnet18")
    assert arch == "resnet18" and not net.training
    with pytest.raises(ValueError, match="no_meta.safetensors: shape mismatch"):
        load_prior(path, "resnet50")


def test_probe_reports_missing_mask(tmp_path: Path, tiny_export: Path, capsys) -> None:
    data = write_fss_tree(tmp_path / "fss")
    (data / "class1" / "2.png").unlink()
    assert main([str(tiny_export), "--data", str(data), "--episodes", "2"]) == 1
    assert "class1/2.png" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# real weights, real photos


def test_imagenet_mobilenet_beats_random_init_on_pets(shared_data: Path, mobilenet_weights: Path) -> None:
    # measured (seed 0, 9 episodes, 224 px): ImageNet 0.53 mIoU vs random init 0.14; seeds 0-7 all >= +0.15
    bench = Fss1000(shared_data / "fss-mini", classes=["Abyssinian", "Bengal", "american_bulldog"])
    cfg = ProbeConfig(episodes=9, seed=0)
    episodes = make_episodes(bench, cfg.shot, cfg.episodes, cfg.seed, query_order="random")
    images = ProbeImages(bench, cfg)
    net, arch = load_prior(mobilenet_weights, "mobilenet_v2")
    pretrained = evaluate_prior(net, episodes, images, cfg.layer, cfg.neighbors)
    random_init = evaluate_prior(random_prior(arch, cfg.seed), episodes, images, cfg.layer, cfg.neighbors)
    assert pretrained["miou"] > random_init["miou"] + 0.2
    assert pretrained["fb_iou"] > random_init["fb_iou"] + 0.15
