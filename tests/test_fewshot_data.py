"""Stage-2 data: benchmark indices on tiny trees in the real layouts, episodes, transforms, loader, real sets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from common.config import ConfigError, load_config
from fewshot.data import coco, pascal
from fewshot.data.base import DataError, EpisodeSpec
from fewshot.data.check import main as check_main
from fewshot.data.coco import Coco20i
from fewshot.data.config import DataConfig
from fewshot.data.episodes import episodes_hash, epoch_episodes, load_episodes, make_episodes, save_episodes
from fewshot.data.fss import Fss1000
from fewshot.data.loader import EpisodeDataset
from fewshot.data.pascal import Pascal5i
from fewshot.data.registry import build_benchmark
from fewshot.data.synthetic import SyntheticFss, make_synthetic_fss
from fewshot.data.transforms import MEAN, STD, EvalTransform, TrainTransform
from fewshot.evaluate import episode_loader

VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(VOC_PALETTE)
    image.save(path)


def rows(label: np.ndarray, start: int, stop: int, value: int, count: int | None = None) -> np.ndarray:
    """Paint rows ``start:stop`` (or the first ``count`` pixels from row ``start``, row-major) with ``value``."""
    flat = label.reshape(-1)
    w = label.shape[1]
    flat[start * w:(start * w + count) if count is not None else stop * w] = value
    return label


# --------------------------------------------------------------------------------------------------
# PASCAL-5i on a tiny VOC tree (64 x 64 = 4096 pixels per image)

VOC_TRAIN = {
    "2008_000001": [(0, 40, 6), (40, 41, 255), (41, 42, 1)],  # 6: 2560 kept; 1: 64 px (a test class anyway)
    "2008_000002": [(0, 40, 7)],                              # 7: 2560
    "2008_000003": [(0, 40, 6), (40, 64, 7)],                 # 6: 2560; 7: 1536 < 2048 -> dropped, still present
    "2008_000004": [(0, 15, 6)],                              # 6: 960 -> image has no kept class
    "2008_000005": [(0, 64, 15)],
    "2008_000006": [(0, 33, 7)],                              # 7: 2112
}
VOC_TEST = {
    "2007_000001": [(0, 40, 1)],
    "2007_000002": [(0, 32, 1), (32, 64, 2)],                 # exactly 2048 each: both kept
    "2007_000003": [(0, 31, 2), (31, 32, 255)],               # 2: 1984 -> dropped
    "2007_000004": [(0, 40, 3)],
}


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("voc")
    lists = root / "lists"
    lists.mkdir()
    for name, table in (("voc_sbd_merge_noduplicate.txt", VOC_TRAIN), ("val.txt", VOC_TEST)):
        lines = []
        for n, (image_id, paints) in enumerate(table.items()):
            label = np.zeros((64, 64), np.uint8)
            for start, stop, value in paints:
                rows(label, start, stop, value)
            write_palette_png(root / "VOC2012" / "SegmentationClassAug" / f"{image_id}.png", label)
            write_jpeg(root / "VOC2012" / "JPEGImages" / f"{image_id}.jpg", 64, 64, n)
            lines.append(f"JPEGImages/{image_id}.jpg SegmentationClassAug/{image_id}.png" if "merge" in name
                         else image_id)
        (lists / name).write_text("\n".join(lines) + "\n")
    return root, lists, tmp_path_factory.mktemp("voc_cache")


def pascal_split(voc_tree, fold, split, **kw) -> Pascal5i:
    root, lists, cache = voc_tree
    kw.setdefault("val_fraction", 0.0)
    return Pascal5i(root, fold, split, cache_dir=cache, split_dir=lists, **kw)


def keys(samples) -> list[str]:
    return [s.key for s in samples]


def test_pascal_folds_are_contiguous_blocks():
    assert pascal.fold_classes(0) == (list(range(6, 21)), [1, 2, 3, 4, 5])
    assert pascal.fold_classes(3)[1] == [16, 17, 18, 19, 20]
    assert pascal.fold_classes("all") == pascal.fold_classes(-1) == (list(range(1, 21)), list(range(1, 21)))
    with pytest.raises(ValueError):
        pascal.fold_classes(4)


def test_pascal_size_filter_and_class_sets(voc_tree):
    test = pascal_split(voc_tree, 0, "test")
    assert test.class_ids == [1, 2, 3, 4, 5]
    assert keys(test.samples_by_class[1]) == ["2007_000001", "2007_000002"]
    assert keys(test.samples_by_class[2]) == ["2007_000002"]  # 2048 kept, 1984 dropped
    assert keys(test.samples_by_class[3]) == ["2007_000004"]
    assert test.image_keys() == ["2007_000001", "2007_000002", "2007_000004"]
    train = pascal_split(voc_tree, 0, "train")
    assert 1 not in train.class_ids and len(train.class_ids) == 15
    assert keys(train.samples_by_class[6]) == ["2008_000001", "2008_000003"]
    assert keys(train.samples_by_class[7]) == ["2008_000002", "2008_000006"]
    assert "2008_000004" not in train.image_keys()
    assert train.query_classes("2008_000003") == [6, 7]  # the query class may be below the filter (PFENet)
    assert pascal_split(voc_tree, 0, "train", min_pixels=1000).query_classes("2008_000003") == [6, 7]
    assert keys(pascal_split(voc_tree, 0, "train", min_pixels=1000).samples_by_class[7]) == [
        "2008_000002", "2008_000003", "2008_000006"]
    everything = pascal_split(voc_tree, "all", "train")
    assert everything.class_ids == list(range(1, 21)) and keys(everything.samples_by_class[1]) == []


def test_pascal_remap_keeps_ignore(voc_tree):
    train = pascal_split(voc_tree, 0, "train")
    image, mask = train.load(train.sample("2008_000001"), 6)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    expected = np.zeros((64, 64), np.uint8)
    rows(expected, 0, 40, 1)
    rows(expected, 40, 41, 255)  # the class-1 row below becomes background
    np.testing.assert_array_equal(mask, expected)


def test_pascal_held_out_val_is_deterministic_and_disjoint(voc_tree):
    train = pascal_split(voc_tree, 0, "train", val_fraction=0.5, val_seed=3)
    val = pascal_split(voc_tree, 0, "val", val_fraction=0.5, val_seed=3)
    assert not set(train.image_keys()) & set(val.image_keys())
    assert set(train.image_keys()) | set(val.image_keys()) == set(pascal_split(voc_tree, 0, "train").image_keys())
    assert val.image_keys() == pascal_split(voc_tree, 0, "val", val_fraction=0.5, val_seed=3).image_keys()
    assert val.class_ids == train.class_ids
    with pytest.raises(ValueError, match="val_fraction"):
        pascal_split(voc_tree, 0, "val", val_fraction=0.0)


def test_pascal_index_only_and_bad_labels(voc_tree, tmp_path):
    root, lists, cache = voc_tree
    masks_only = tmp_path / "VOC2012" / "SegmentationClassAug"
    masks_only.mkdir(parents=True)
    for path in (root / "VOC2012" / "SegmentationClassAug").iterdir():
        (masks_only / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="JPEGImages"):
        Pascal5i(tmp_path, 0, "test", cache_dir=cache, split_dir=lists)
    assert Pascal5i(tmp_path, 0, "test", index_only=True, cache_dir=cache, split_dir=lists).num_pairs() == 4
    bad = np.zeros((64, 64), np.uint8)
    bad[0, 0] = 30
    write_palette_png(masks_only / "2007_000003.png", bad)
    with pytest.raises(DataError, match=r"2007_000003\.png.*30"):
        Pascal5i(tmp_path, 0, "test", index_only=True, cache_dir=tmp_path / "fresh_cache", split_dir=lists)


# --------------------------------------------------------------------------------------------------
# COCO-20i from a tiny instances JSON (polygons, RLE, crowd)

CATEGORY_IDS = [i + i // 10 + 1 for i in range(80)]  # COCO-like ids with gaps, mapped to 1..80


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    crowd = np.zeros((48, 64), np.uint8)
    crowd[:, 52:] = 1
    rle_region = np.zeros((48, 64), np.uint8)
    rle_region[:30, :70] = 1  # 30 x 64 = 1920 < 2048 (class 2 dropped in train)
    big_rle = np.zeros((48, 64), np.uint8)
    big_rle[:40, :] = 1        # 2560
    tables = {
        "train": ([(11, 48, 64), (12, 48, 64)], [
            (11, 1, box(0, 0, 48, 48), 0),      # class 1 polygon: about 2304 px
            (11, 1, rle(crowd), 1),             # class 1 crowd on the right: ignored
            (11, 2, rle(rle_region), 0),        # class 2 RLE: 1920 px
            (11, 3, box(0, 0, 40, 30), 0),      # class 3: two overlapping 1200 px boxes, union 1800 < 2048
            (11, 3, box(20, 0, 60, 30), 0),
            (12, 1, box(0, 0, 60, 40), 0),
        ]),
        "val": ([(21, 48, 64), (22, 48, 64)], [
            (21, 2, rle(big_rle), 0),
            (22, 6, box(0, 0, 64, 36), 0),
            (22, 5, box(0, 40, 8, 48), 0),
        ]),
    }
    for part, (images, anns) in tables.items():
        for image_id, h, w in images:
            write_jpeg(root / f"{part}2017" / f"{image_id:012d}.jpg", h, w, image_id)
        body = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, h, w in images],
                "categories": [{"id": c, "name": f"thing{c}"} for c in CATEGORY_IDS],
                "annotations": [{"id": n + 1, "image_id": i, "category_id": CATEGORY_IDS[c - 1], "segmentation": seg,
                                 "iscrowd": crowd_flag, "area": 0.0, "bbox": [0, 0, 1, 1]}
                                for n, (i, c, seg, crowd_flag) in enumerate(anns)]}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{part}2017.json").write_text(json.dumps(body))
    return root


def test_coco_folds_are_interleaved():
    train, test = coco.fold_classes(1)
    assert test == [2 + 4 * k for k in range(20)]
    assert sorted(train + test) == list(range(1, 81))
    assert all(len(set(coco.fold_classes(f)[1]) & set(coco.fold_classes(g)[1])) == 0
               for f in range(4) for g in range(4) if f < g)


def test_coco_index_filter_and_masks(coco_tree, tmp_path):
    train = Coco20i(coco_tree, fold=1, split="train", val_fraction=0.0, cache_dir=tmp_path)
    assert train.year == "2017" and train.class_names[1] == f"thing{CATEGORY_IDS[0]}"
    assert keys(train.samples_by_class[1]) == ["000000000011", "000000000012"]
    assert train.samples_by_class[3] == []                      # union 1800 even though the areas sum to 2400
    assert train.query_classes("000000000011") == [1, 3]        # class 2 is a test class of fold 1
    assert Coco20i(coco_tree, 1, "train", val_fraction=0.0, min_pixels=1700,
                   cache_dir=tmp_path).query_classes("000000000011") == [1, 3]
    image, mask = train.load(train.sample("000000000011"), 1)
    assert image.shape == (48, 64, 3)
    expected = np.zeros((48, 64), np.uint8)
    expected[:, 52:] = 255
    expected[mask_utils.decode(mask_utils.frPyObjects(box(0, 0, 48, 48), 48, 64))[..., 0] > 0] = 1
    np.testing.assert_array_equal(mask, expected)
    test = Coco20i(coco_tree, fold=1, split="test", cache_dir=tmp_path)
    assert keys(test.samples_by_class[2]) == ["000000000021"] and keys(test.samples_by_class[6]) == ["000000000022"]
    assert test.class_ids == [2 + 4 * k for k in range(20)]
    _, mask = test.load(test.sample("000000000021"), 2)
    assert (mask == 1).sum() == 2560 and set(np.unique(mask)) == {0, 1}


# --------------------------------------------------------------------------------------------------
# FSS-1000 layout

def write_fss_class(root: Path, name: str, n: int, size: int = 40) -> None:
    for i in range(1, n + 1):
        write_jpeg(root / name / f"{i}.jpg", size, size, i)
        mask = np.zeros((size, size), np.uint8)
        mask[5:25, 5:25] = 200
        mask[25:30, 5:25] = 100  # below 128: background
        Image.fromarray(mask).save(root / name / f"{i}.png")


@pytest.fixture
def fss_tree(tmp_path: Path) -> Path:
    for name, n in (("bird", 4), ("ant", 3), ("cup", 2)):
        write_fss_class(tmp_path / "FSS-1000", name, n)
    return tmp_path


def test_fss_classes_and_binarisation(fss_tree):
    everything = Fss1000(fss_tree, "all")
    assert everything.class_names == {1: "ant", 2: "bird", 3: "cup"}
    assert keys(everything.samples_by_class[2]) == ["bird/1", "bird/2", "bird/3", "bird/4"]
    chosen = Fss1000(fss_tree, classes=["cup", "bird"])
    assert chosen.class_names == {1: "bird", 2: "cup"}
    _, mask = chosen.load(chosen.sample("cup/2"), 2)
    assert (mask == 1).sum() == 400 and set(np.unique(mask)) == {0, 1}
    with pytest.raises(DataError, match="abe's_flyingfish"):
        Fss1000(fss_tree, "test")  # the shipped official test split names classes this tree lacks


def test_shipped_split_files():
    split_dir = Path(pascal.__file__).parent / "splits"
    train_ids = pascal.read_id_list(split_dir / "pascal" / "voc_sbd_merge_noduplicate.txt")
    test_ids = pascal.read_id_list(split_dir / "pascal" / "val.txt")
    assert (len(train_ids), len(test_ids)) == (5953, 1449) and not set(train_ids) & set(test_ids)
    fss_test = (split_dir / "fss" / "test.txt").read_text().split("\n")[:-1]
    assert len(fss_test) == len(set(fss_test)) == 240


# --------------------------------------------------------------------------------------------------
# episodes

def test_episodes_are_deterministic_and_valid(fss_tree):
    bench = Fss1000(fss_tree, "all")
    first = make_episodes(bench, 1, 60, seed=5)
    assert first == make_episodes(bench, 1, 60, seed=5)
    assert first != make_episodes(bench, 1, 60, seed=6)
    assert {e.class_id for e in first} == {1, 2, 3}
    with pytest.warns(UserWarning, match="cup: 2"):
        two_shot = make_episodes(bench, 2, 40, seed=0)  # cup has 2 images: no 2-shot episode of it
    assert {e.class_id for e in two_shot} == {1, 2}
    for e in first + two_shot:
        members = keys(bench.samples_by_class[e.class_id])
        assert e.query in members and set(e.supports) <= set(members)
        assert e.query not in e.supports and len(set(e.supports)) == len(e.supports)


def test_cycle_and_shuffle_orders(fss_tree):
    bench = Fss1000(fss_tree, "all")
    every = make_episodes(bench, 1, 0, seed=0, query_order="cycle")
    assert [e.query for e in every] == bench.image_keys() and len(every) == 9
    wrapped = make_episodes(bench, 1, 12, seed=0, query_order="cycle")
    assert [e.query for e in wrapped[9:]] == bench.image_keys()[:3]
    shuffled = epoch_episodes(bench, 1, seed=0, epoch=1)
    assert sorted(e.query for e in shuffled) == sorted(bench.image_keys())
    assert shuffled == make_episodes(bench, 1, 0, seed=1, query_order="shuffle")
    assert shuffled != epoch_episodes(bench, 1, seed=0, epoch=2)


def test_episode_file_round_trip_and_tamper_check(tmp_path):
    episodes = [EpisodeSpec("a/1", ("a/2", "a/3"), 1), EpisodeSpec("b/1", ("b/2", "b/4"), 2)]
    digest = save_episodes(episodes, tmp_path / "ep.json", meta={"shot": 2})
    assert digest == episodes_hash(episodes) and load_episodes(tmp_path / "ep.json") == episodes
    body = json.loads((tmp_path / "ep.json").read_text())
    body["episodes"][0][2] = 2
    (tmp_path / "ep.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match="hash"):
        load_episodes(tmp_path / "ep.json")


# --------------------------------------------------------------------------------------------------
# transforms

def test_train_transform_shapes_and_determinism():
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), np.uint8)
    mask[10:40, 20:70] = 1
    mask[0, :] = 255
    tf = TrainTransform(97)
    img, lab = tf(image, mask, np.random.default_rng(1))
    assert img.shape == (3, 97, 97) and img.dtype == torch.float32
    assert lab.shape == (97, 97) and lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1, 255}
    again = tf(image, mask, np.random.default_rng(1))
    assert torch.equal(img, again[0]) and torch.equal(lab, again[1])
    assert (lab == 255).sum() > 90  # small image: centred padding with 255 around it
    with pytest.raises(ValueError, match="8n\\+1"):
        TrainTransform(96)
    with pytest.raises(ValueError, match="8n\\+1"):
        EvalTransform(400, "hsnet")


def test_train_long_side_resizes_the_whole_image_before_the_crop():
    """A 320x160 image with its left half foreground, long side 33: the whole image is 33x16 (no crop needed),
    centred in a 33x33 canvas padded with 255; without the option the crop would be a 33x33 patch of it."""
    image = np.zeros((160, 320, 3), np.uint8)
    mask = np.zeros((160, 320), np.uint8)
    mask[:, :160] = 1
    tf = TrainTransform(33, scale=(1.0, 1.0), rotate=(0.0, 0.0), long_side=33)
    _, lab = tf(image, mask, np.random.default_rng(0))
    content = lab[lab != 255]
    assert int((lab == 255).sum()) == 33 * 33 - 16 * 33 and content.numel() == 16 * 33
    assert abs(float((content == 1).float().mean()) - 0.5) < 0.05
    _, patch = TrainTransform(33, scale=(1.0, 1.0), rotate=(0.0, 0.0))(image, mask, np.random.default_rng(0))
    assert not (patch == 255).any()


def test_train_crop_redraws_to_keep_the_foreground():
    image = np.zeros((120, 120, 3), np.uint8)
    mask = np.zeros((120, 120), np.uint8)
    mask[60:68, 20:28] = 1  # a 49-crop keeps it whole with p ~0.17 per draw

    def kept(redraws: int, seed: int) -> float:
        _, lab = TrainTransform(49, scale=(1.0, 1.0), redraws=redraws)(image, mask, np.random.default_rng(seed))
        return float((lab == 1).sum()) / 64

    with_redraws = [kept(30, s) for s in range(20)]
    without = [kept(0, s) for s in range(20)]
    assert sum(k >= 0.85 for k in with_redraws) >= 19
    assert sum(k >= 0.85 for k in without) < 10


def test_pfenet_eval_keeps_aspect_and_pads_with_ignore():
    image = np.full((100, 50, 3), 200, np.uint8)
    mask = np.zeros((100, 50), np.uint8)
    mask[:, 25:] = 1
    img, lab = EvalTransform(97, "pfenet")(image, mask)
    # long side 100 -> 97, floored to 96; short side int(50 * 0.97) = 48 (a multiple of 8)
    assert img.shape == (3, 97, 97) and lab.shape == (97, 97)
    assert (lab[:96, :48] != 255).all() and (lab[96:, :] == 255).all() and (lab[:, 48:] == 255).all()
    assert (lab[:96, 24:48] == 1).all() and (lab[:96, :24] == 0).all()
    zero = torch.tensor([-m / s for m, s in zip(MEAN, STD)])  # the canvas is zeros before normalisation
    assert torch.allclose(img[:, 96, 0], zero) and torch.allclose(img[:, 0, 60], zero)
    assert torch.allclose(img[:, 10, 10], torch.tensor([(200 - m) / s for m, s in zip(MEAN, STD)]), atol=1e-4)
    _, square = EvalTransform(97, "hsnet")(image, mask)
    assert (square != 255).all() and (square[:, 49:] == 1).all()


# --------------------------------------------------------------------------------------------------
# loader

def test_loader_batches_do_not_depend_on_workers(fss_tree):
    bench = Fss1000(fss_tree, "all")
    episodes = make_episodes(bench, 2, 6, seed=3)
    dataset = EpisodeDataset(bench, episodes, TrainTransform(33, scale=(0.8, 1.2)), shot=2, seed=9, epoch=4)
    serial, parallel = list(episode_loader(dataset, 3, 0)), list(episode_loader(dataset, 3, 2))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert a["query"].shape == (3, 3, 33, 33) and a["supports"].shape == (3, 2, 3, 33, 33)
        assert a["support_masks"].shape == (3, 2, 33, 33) and a["support_masks"].dtype == torch.int64
        for name in ("query", "query_mask", "supports", "support_masks", "class_id", "episode_index"):
            assert torch.equal(a[name], b[name]), name
        assert a["query_key"] == b["query_key"] and a["orig_size"] == [(40, 40)] * 3
        assert a["query_mask_orig"][0].dtype == torch.uint8 and a["query_mask_orig"][0].shape == (40, 40)
    other_epoch = EpisodeDataset(bench, episodes, TrainTransform(33, scale=(0.8, 1.2)), shot=2, seed=9, epoch=5)
    assert not torch.equal(dataset[0]["query"], other_epoch[0]["query"])


def test_bad_input_errors_name_the_file(fss_tree):
    folder = fss_tree / "FSS-1000"
    (folder / "bird" / "2.jpg").write_bytes(b"this is not a jpeg")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(folder / "bird" / "3.png")  # wrong size
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "ant" / "3.png")   # no foreground
    bench = Fss1000(fss_tree, "all")
    bird, ant = 2, 1
    cases = [
        (EpisodeSpec("bird/2", ("bird/1",), bird), r"bird/2\.jpg.*unreadable"),
        (EpisodeSpec("bird/3", ("bird/1",), bird), r"bird/3\.jpg.*40x40.*bird/3\.png.*30x30"),
        (EpisodeSpec("ant/1", ("ant/3",), ant), r"ant/3\.png: support mask has no foreground"),
        (EpisodeSpec("ant/3", ("ant/1",), ant), r"ant/3\.png: query mask has no pixel of its episode class"),
        (EpisodeSpec("ant/9", ("ant/1",), ant), r"ant/9"),
    ]
    for episode, message in cases:
        with pytest.raises(DataError, match=message):
            EpisodeDataset(bench, [episode], EvalTransform(33))[0]
    good = EpisodeSpec("bird/1", ("bird/4",), bird)
    skipping = EpisodeDataset(bench, [good] + [e for e, _ in cases], EvalTransform(33), on_bad_sample="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (batch,) = list(episode_loader(skipping, 6))
    assert batch["size"] == 1 and batch["query_key"] == ["bird/1"] and len(batch["skipped"]) == 5
    assert "bird/2.jpg" in batch["skipped"][0]


# --------------------------------------------------------------------------------------------------
# synthetic set, registry, config, check

def test_synthetic_set_is_deterministic_and_split_by_class(tmp_path):
    a = make_synthetic_fss(tmp_path / "a", classes=6, per_class=3, size=48, seed=2)
    b = make_synthetic_fss(tmp_path / "b", classes=6, per_class=3, size=48, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.*")) and len(files) == 6 * 3 * 2 + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    splits = json.loads((a / "splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert make_synthetic_fss(tmp_path / "a", classes=6, per_class=3, size=48, seed=2) == a  # reused
    with pytest.raises(FileExistsError):
        make_synthetic_fss(tmp_path / "a", classes=6, per_class=3, size=48, seed=3)
    test = SyntheticFss(tmp_path / "a", "test", classes=6, per_class=3, size=48, seed=2)
    image, mask = test.load(test.samples_by_class[1][0], 1)
    assert image.shape == (48, 48, 3) and 0 < mask.sum() < 48 * 48


def test_registry_and_config(tmp_path):
    cfg = DataConfig(benchmark="synthetic", root=str(tmp_path), synthetic_classes=6, synthetic_per_class=3,
                     synthetic_size=48)
    bench = build_benchmark(cfg, "train")
    assert bench.name == "synthetic" and len(bench.class_ids) == 4
    with pytest.raises(ValueError, match="data.benchmark"):
        build_benchmark(DataConfig(benchmark="nope"), "train")
    with pytest.raises(ConfigError, match="8n\\+1"):
        load_config(DataConfig, overrides=["train_size=96"])
    assert load_config(DataConfig, overrides=["fold=all", "scale=[0.8, 1.25]"]).scale == (0.8, 1.25)


def test_check_reports_the_first_missing_file(fss_tree, capsys):
    assert check_main(["--benchmark", "fss1000", "--root", str(fss_tree), "--splits", "all"]) == 0
    (fss_tree / "FSS-1000" / "cup" / "2.jpg").unlink()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(fss_tree / "FSS-1000" / "cup" / "2.jpg")
    (fss_tree / "FSS-1000" / "ant" / "1.jpg").write_bytes(b"")
    assert check_main(["--benchmark", "fss1000", "--root", str(fss_tree), "--splits", "all"]) == 1
    out = capsys.readouterr().out
    assert "3 classes" not in out and "9 (image, class) pairs" in out
    assert "first problem: " in out and "ant/1.jpg: unreadable" in out


# --------------------------------------------------------------------------------------------------
# real data in ../shared/data (skipped when absent)

def test_real_pascal_counts_per_fold(shared_data, tmp_path_factory):
    """Index-only counts from all real SBD-augmented masks (a full scan: about 10 s on 2 cores)."""
    root, cache = shared_data / "voc-masks", tmp_path_factory.mktemp("real_voc_cache")
    mask_dir = root / "VOC2012" / "SegmentationClassAug"
    split_dir = Path(pascal.__file__).parent / "splits" / "pascal"
    for name in ("voc_sbd_merge_noduplicate.txt", "val.txt"):
        missing = [i for i in pascal.read_id_list(split_dir / name) if not (mask_dir / f"{i}.png").is_file()]
        assert missing == [], f"{name}: {len(missing)} ids without a mask, e.g. {missing[:3]}"
    expected = {  # fold: (train images, train pairs, test images, test pairs) with the reference list untouched
        0: (4760, 6546, 364, 365), 1: (4588, 5896, 445, 467), 2: (4097, 4628, 592, 734), 3: (5108, 6639, 336, 357)}
    for fold, numbers in expected.items():
        train = Pascal5i(root, fold, "train", val_fraction=0.0, index_only=True, cache_dir=cache)
        test = Pascal5i(root, fold, "test", index_only=True, cache_dir=cache)
        assert (len(train.image_keys()), train.num_pairs(), len(test.image_keys()), test.num_pairs()) == numbers
    assert [len(s) for s in Pascal5i(root, 0, "test", index_only=True, cache_dir=cache).samples_by_class.values()] \
        == [81, 63, 89, 61, 71]


def test_real_coco_mini_masks_match_pycocotools(shared_data, tmp_path):
    root = shared_data / "coco-mini" / "COCO-MINI"
    bench = Coco20i(root, fold="all", split="test", cache_dir=tmp_path)
    assert bench.year == "2017" and len(bench.image_keys()) > 50
    checked = 0
    for key in bench.image_keys()[:12]:
        image_id = bench.image_ids[key]
        for c in bench.query_classes(key):
            image, mask = bench.load(bench.sample(key), c)
            anns = bench.coco.loadAnns(bench.coco.getAnnIds(imgIds=image_id, catIds=[bench.category_ids[c - 1]]))
            union = np.zeros(mask.shape, bool)
            for ann in anns:
                if not ann["iscrowd"]:
                    union |= bench.coco.annToMask(ann) > 0
            assert image.shape[:2] == mask.shape
            np.testing.assert_array_equal(mask == 1, union)
            checked += 1
    assert checked > 12


def test_real_fss_mini_loads(shared_data):
    bench = Fss1000(shared_data / "fss-mini", "all")
    counts = {bench.class_names[c]: len(s) for c, s in bench.samples_by_class.items()}
    assert counts == {"Abyssinian": 200, "Bengal": 200, "african_elephant": 5, "american_bulldog": 200,
                      "eiffel_tower": 5}
    episodes = make_episodes(bench, 1, 4, seed=0)
    batch = next(iter(episode_loader(EpisodeDataset(bench, episodes, EvalTransform(97)), 4)))
    assert batch["size"] == 4 and batch["query"].shape == (4, 3, 97, 97)
    assert all((m == 1).any() for m in batch["query_mask_orig"])


# --------------------------------------------------------------------------------------------------
# full label maps (BAM's base learner, fewshot.data.base_labels)

def test_pascal_full_label_map_and_base_remapping(voc_tree):
    from fewshot.data.base_labels import base_channels, load_full, remap_to_base

    train = pascal_split(voc_tree, 0, "train")
    image, label = load_full(train, "2008_000001")
    assert image.shape == (64, 64, 3) and label.dtype == np.int32
    assert (label[:40] == 6).all() and (label[40] == -1).all() and (label[41] == 1).all() and (label[42:] == 0).all()
    channels = base_channels(train)
    assert channels == {c: c - 5 for c in range(6, 21)}    # fold 0: classes 6..20 -> channels 1..15
    target = remap_to_base(label, channels)
    assert (target[:40] == 1).all() and (target[40] == 255).all()
    assert (target[41] == 0).all()                         # class 1 is a test (novel) class: background


def test_coco_full_label_map_is_rasterised_once_and_cached(coco_tree, tmp_path):
    from fewshot.data.base_labels import load_full

    train = Coco20i(coco_tree, fold=1, split="train", val_fraction=0.0, cache_dir=tmp_path)
    _, label = load_full(train, "000000000011")
    decode = lambda seg: mask_utils.decode(mask_utils.frPyObjects(seg, 48, 64))[..., 0] > 0  # noqa: E731
    box1, box3 = decode(box(0, 0, 48, 48)), decode(box(0, 0, 40, 30)) | decode(box(20, 0, 60, 30))
    region2 = np.zeros((48, 64), bool)
    region2[:30] = True
    # largest instance first: class 1 (48 x 48), class 2 (30 x 64) over it, the 1,200-pixel boxes of 3 on top
    expected = np.zeros((48, 64), np.int32)
    expected[:, 52:] = -1                                  # the crowd region no instance covers
    expected[box1] = 1
    expected[region2] = 2
    expected[box3] = 3
    np.testing.assert_array_equal(label, expected)
    cached = list(tmp_path.glob("coco_labels_instances_train2017_*/11.png"))
    assert len(cached) == 1
    train.rasterise = None                                 # a second read must come from the cache
    np.testing.assert_array_equal(load_full(train, "000000000011")[1], expected)
