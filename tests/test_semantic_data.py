"""The generic semantic layout (``data.benchmark=semantic``): a tiny hand-painted tree, then the real shared sets."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError, load_config
from fewshot.data import semantic
from fewshot.data.base import DataError
from fewshot.data.config import DataConfig
from fewshot.data.episodes import make_episodes
from fewshot.data.registry import BENCHMARKS, build_benchmark
from fewshot.data.semantic import SemanticFolder

SIDE = 16  # 16 x 16 = 256 pixels per image; rows of 16 pixels are painted below
CLASSES = {"1": "cat", "2": "dog", "3": "car", "4": "tree", "5": "sky", "6": "road"}
# id -> (start row, stop row, value); 0 = background, 255 and 254 (listed under "ignore") = ignore, 9 unlisted
PAINT = {
    "a": [(0, 5, 1), (5, 6, 255), (6, 8, 2), (8, 9, 254)],  # cat 80, dog 32
    "b": [(0, 4, 1), (4, 5, 3)],                            # cat 64, car 16 (< 32)
    "c": [(0, 6, 2), (6, 10, 3), (10, 11, 9)],              # dog 96, car 64, unlisted 9 -> background
    "d": [(0, 1, 1), (1, 8, 4)],                            # cat 16 (< 32), tree 112
    "e": [(0, 8, 4), (8, 16, 5)],                           # tree 128, sky 128
    "f": [(0, 16, 6)],                                      # road 256
}
MIN = 32


def paint(rows: list[tuple[int, int, int]]) -> np.ndarray:
    label = np.zeros((SIDE, SIDE), np.uint8)
    for start, stop, value in rows:
        label[start:stop] = value
    return label


def write_tree(root: Path, splits: dict[str, list[str]] | None = None, paint_table: dict | None = None) -> Path:
    """images/<id>.jpg (or .png for 'f'), labels/<id>.png (mode L; 'e' as a palette PNG), classes.json."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for n, (i, rows) in enumerate((paint_table or PAINT).items()):
        pixels = np.random.default_rng(n).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.{'png' if i == 'f' else 'jpg'}")
        label = Image.fromarray(paint(rows), mode="L")
        if i == "e":
            label = label.convert("P")
        label.save(root / "labels" / f"{i}.png")
    meta: dict = {"classes": CLASSES, "ignore": 254}
    if splits:
        meta["splits"] = splits
    (root / "classes.json").write_text(json.dumps(meta))
    return root


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "sem")


def build(root: Path, split: str = "train", fold: int | str = "all", **kw) -> SemanticFolder:
    kw.setdefault("min_pixels", MIN)
    kw.setdefault("cache_dir", root.parent / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tree has single-image classes on purpose
        return SemanticFolder(root, split, fold, **kw)


def keys(bench: SemanticFolder) -> dict[str, list[str]]:
    return {bench.class_names[c]: [s.key for s in bench.samples_by_class[c]] for c in bench.class_ids}


# --------------------------------------------------------------------------------------------------
# index, filter, masks


def test_pairs_per_class_and_min_pixels(tree):
    bench = build(tree)
    assert bench.name == "semantic" and bench.class_ids == [1, 2, 3, 4, 5, 6]
    assert keys(bench) == {"cat": ["a", "b"], "dog": ["a", "c"], "car": ["c"], "tree": ["d", "e"], "sky": ["e"],
                           "road": ["f"]}
    assert bench.num_pairs() == 9 and bench.image_keys() == ["a", "b", "c", "d", "e", "f"]
    assert bench.query_classes("b") == [1] and bench.query_classes("d") == [4]  # below the filter: not asked
    every = build(tree, min_pixels=0)
    assert keys(every)["cat"] == ["a", "b", "d"] and keys(every)["car"] == ["b", "c"]
    assert every.query_classes("b") == [1, 3]
    assert keys(build(tree, min_pixels=80))["cat"] == ["a"]  # exactly min_pixels is kept


def test_load_maps_other_classes_to_background_and_keeps_ignore(tree):
    bench = build(tree)
    image, mask = bench.load(bench.sample("a"), 1)
    assert image.shape == (SIDE, SIDE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIDE, SIDE) and mask.dtype == np.uint8
    expected = np.zeros((SIDE, SIDE), np.uint8)
    expected[0:5] = 1
    expected[5:6] = 255  # 255 stays ignore
    expected[8:9] = 255  # 254 is an 'ignore' value of classes.json
    assert np.array_equal(mask, expected)  # dog rows 6-7 and background are 0
    _, mask = bench.load(bench.sample("c"), 3)
    assert set(np.unique(mask)) == {0, 1} and (mask == 1).sum() == 64  # unlisted 9 is background
    _, mask = bench.load(bench.sample("e"), 5)  # palette label
    assert (mask == 1).sum() == 128


def test_episodes_draw_from_the_index(tree):
    bench = build(tree, min_pixels=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        episodes = make_episodes(bench, shot=1, n_episodes=20, seed=0)
    for e in episodes:
        assert e.query not in e.supports
        assert all(s in {x.key for x in bench.samples_by_class[e.class_id]} for s in (e.query, *e.supports))


# --------------------------------------------------------------------------------------------------
# class splits


def test_interleaved_folds(tree):
    for fold, test in ((0, [1, 4]), (1, [2, 5]), (2, [3, 6])):
        bench = build(tree, "test", fold, folds=3)
        assert bench.class_ids == test
        assert bench.train_classes == [c for c in range(1, 7) if c not in test]
        assert build(tree, "train", fold, folds=3).class_ids == bench.train_classes
    everything = build(tree, "train", "all", folds=3)
    assert everything.class_ids == [1, 2, 3, 4, 5, 6] and everything.test_classes == [1, 2, 3, 4, 5, 6]
    assert build(tree, "test", -1).class_ids == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="fold=3 must be 0-2"):
        build(tree, "train", 3, folds=3)
    with pytest.raises(ValueError, match="needs a class split"):
        build(tree, "train", 0)


def test_validation_classes_are_held_out_of_training(tree):
    val = build(tree, "val", 0, folds=3, val_fraction_classes=0.3)  # round(0.3 * 4) = 1 of the 4 training classes
    train = build(tree, "train", 0, folds=3, val_fraction_classes=0.3)
    assert len(val.class_ids) == 1 and val.class_ids[0] not in train.class_ids + [1, 4]
    assert sorted(train.class_ids + val.class_ids) == [2, 3, 5, 6]
    assert build(tree, "val", 0, folds=3, val_fraction_classes=0.3).class_ids == val.class_ids  # deterministic
    explicit = build(tree, "val", 0, folds=3, val_classes=["sky"])
    assert explicit.class_ids == [5] and explicit.train_classes == [2, 3, 6]
    with pytest.raises(DataError, match="class 'tree' \\(id 4\\) is in both the val and test class lists"):
        build(tree, "val", 0, folds=3, val_classes=["tree"])
    with pytest.raises(DataError, match="split 'val' has no classes"):
        build(tree, "val", 0, folds=3)  # no val classes and no 'val' image list


def test_explicit_class_lists(tree):
    split = {"train": ["cat", 2], "val": ["tree"], "test": ["car", "6"]}  # names or ids, as config strings do
    assert build(tree, "train", classes=split).class_ids == [1, 2]
    assert build(tree, "val", classes=split).class_ids == [4]
    assert build(tree, "test", classes=split).class_ids == [3, 6]
    rest = build(tree, "train", classes={"test": ["sky"], "val": ["road"]})
    assert rest.class_ids == [1, 2, 3, 4] and rest.test_classes == [5] and rest.val_classes == [6]
    with pytest.raises(DataError, match="class 'dog' \\(id 2\\) is in both the train and test class lists"):
        build(tree, "train", classes={"train": ["cat", "dog"], "test": ["dog"]})
    with pytest.raises(DataError, match="class 'zebra' of the test list is not in .*classes.json"):
        build(tree, "test", classes={"test": ["zebra"]})
    with pytest.raises(ValueError, match="not both"):
        build(tree, "train", classes={"test": ["sky"]}, folds=2)


# --------------------------------------------------------------------------------------------------
# image splits from classes.json


def test_image_splits_from_classes_json(tmp_path):
    root = write_tree(tmp_path / "sem", splits={"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]})
    assert build(root, "train").image_keys() == ["a", "b", "c"]
    assert build(root, "test").image_keys() == ["e", "f"]
    val = build(root, "val")  # no validation classes: the training classes on the 'val' images
    assert val.class_ids == [1, 2, 3, 4, 5, 6] and val.image_keys() == ["d"]
    assert keys(build(root, "test", classes={"train": ["cat"], "test": ["sky", "road"]})) == {"sky": ["e"],
                                                                                             "road": ["f"]}
    meta = json.loads((root / "classes.json").read_text())
    meta["splits"]["test"].append("zz")
    (root / "classes.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="classes.json: 1 image id\\(s\\) of split 'test'.*'zz'"):
        build(root, "test")
    meta["splits"]["test"] = ["e", "f", "a"]
    (root / "classes.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="image id 'a' is listed in both 'train' and 'test'"):
        build(root, "train")


# --------------------------------------------------------------------------------------------------
# bad input


def test_missing_or_malformed_classes_json(tree, tmp_path):
    with pytest.raises(DataError, match="nowhere: semantic dataset folder is missing"):
        build(tmp_path / "nowhere")
    (tree / "classes.json").write_text("{not json")
    with pytest.raises(DataError, match="classes.json: not valid JSON"):
        build(tree)
    (tree / "classes.json").write_text(json.dumps({"classes": CLASSES, "split": {}}))
    with pytest.raises(DataError, match="unknown key 'split'"):
        build(tree)
    (tree / "classes.json").write_text(json.dumps({"classes": {"x": "cat"}}))
    with pytest.raises(DataError, match="class id 'x' is not an integer 0-254"):
        build(tree)
    (tree / "classes.json").write_text(json.dumps({"classes": {"1": "cat", "2": "cat"}}))
    with pytest.raises(DataError, match="class name 'cat' is used by ids 1 and 2"):
        build(tree)
    (tree / "classes.json").unlink()
    with pytest.raises(DataError, match=f"{tree / 'classes.json'}: classes.json is missing"):
        build(tree)


def test_bad_label_files_are_named(tree):
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(tree / "labels" / "b.png")  # RGB label
    with pytest.raises(DataError, match=f"{tree / 'labels' / 'b.png'}: label PNG has mode RGB"):
        build(tree)
    (tree / "labels" / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"{tree / 'labels' / 'b.png'}: label file is unreadable"):
        build(tree)
    (tree / "labels" / "b.png").unlink()
    with pytest.raises(DataError, match=f"{tree / 'images' / 'b.jpg'}: image has no label"):
        build(tree)
    (tree / "images" / "b.jpg").unlink()
    Image.fromarray(paint([(0, 2, 1)]), mode="L").save(tree / "labels" / "zz.png")
    with pytest.raises(DataError, match=f"{tree / 'labels' / 'zz.png'}: label has no image"):
        build(tree)


def test_size_mismatch_names_both_files(tree):
    bench = build(tree)
    Image.fromarray(np.zeros((SIDE, SIDE + 2), np.uint8), mode="L").save(tree / "labels" / "a.png")
    image, label = tree / "images" / "a.jpg", tree / "labels" / "a.png"
    with pytest.raises(DataError, match=f"{image}: image is 16x16 but its mask {label} is 18x16"):
        bench.load(bench.sample("a"), 1)  # at load time
    with pytest.raises(DataError, match=f"{image}: image is 16x16 but its label {label} is 18x16"):
        build(tree)  # and at construction, before any training


def test_warnings_name_classes_and_unlisted_values(tree):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SemanticFolder(tree, "train", "all", min_pixels=MIN, cache_dir=tree.parent / "cache")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "label values 9 (e.g. c.png) are not in" in messages[0] and "count as background" in messages[0]
    assert "3 class(es) have fewer than 2 indexed images" in messages[1]
    assert "car (id 3): 1, sky (id 5): 1, road (id 6): 1" in messages[1]


def test_index_cache_is_reused_until_a_file_changes(tree, monkeypatch):
    first = build(tree)
    assert len(list((tree.parent / "cache").glob("semantic_*.json"))) == 1

    def no_scan(*args, **kwargs):
        raise AssertionError("rescanned although the cache is valid")

    monkeypatch.setattr(semantic, "scan_labels", no_scan)
    again = build(tree, min_pixels=0)  # another size filter reuses the same counts
    assert keys(build(tree)) == keys(first) and keys(again)["car"] == ["b", "c"]
    Image.fromarray(paint([(0, 3, 6)]), mode="L").save(tree / "labels" / "a.png")
    os.utime(tree / "labels" / "a.png", ns=(1, 1))  # a changed label changes the key even within one mtime tick
    with pytest.raises(AssertionError, match="rescanned"):
        build(tree)


# --------------------------------------------------------------------------------------------------
# config and registry


def test_registry_and_config_keys(tree):
    assert BENCHMARKS["semantic"] is SemanticFolder
    cfg = load_config(DataConfig, overrides=["benchmark=semantic", f"root={tree}", "semantic_folds=3", "fold=1",
                                             f"min_pixels={MIN}", f"cache_dir={tree.parent / 'cache'}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_benchmark(cfg, "test").class_ids == [2, 5]
        cfg = load_config(DataConfig, overrides=["benchmark=semantic", f"root={tree}", "min_pixels=0",
                                                 "semantic_classes={train: [cat, dog], test: [3]}",
                                                 f"cache_dir={tree.parent / 'cache'}"])
        assert build_benchmark(cfg, "test").class_ids == [3]
    with pytest.raises(ConfigError, match="data.fold=5 must be 0-3, -1 or 'all' with data.semantic_folds=4"):
        load_config(DataConfig, overrides=["benchmark=semantic", "semantic_folds=4", "fold=5"])
    assert load_config(DataConfig, overrides=["benchmark=semantic", "semantic_folds=8", "fold=5"]).fold == 5
    with pytest.raises(ConfigError, match="data.benchmark=semantic with data.fold=0 needs a class split"):
        load_config(DataConfig, overrides=["benchmark=semantic"])
    with pytest.raises(ConfigError, match="data.semantic_folds=1 must be 0"):
        load_config(DataConfig, overrides=["semantic_folds=1"])
    with pytest.raises(ConfigError, match="data.semantic_classes has split 'dev'"):
        load_config(DataConfig, overrides=["semantic_classes={dev: [a]}"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(DataConfig, overrides=["semantic_classes={test: [a]}", "semantic_folds=2"])
    with pytest.raises(ConfigError, match="val_class_fraction=1.0 must be in"):
        load_config(DataConfig, overrides=["val_class_fraction=1.0"])
    with pytest.raises(ConfigError, match="unknown config key 'semantic_fold'"):
        load_config(DataConfig, overrides=["semantic_fold=2"])


# --------------------------------------------------------------------------------------------------
# the real shared sets (skipped when ../shared/data is absent)


def test_real_coco128_counts(shared_data, tmp_path):
    root = shared_data / "semantic" / "coco128"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several COCO classes occur in 0-1 of these 128 images
        every = SemanticFolder(root, "train", "all", min_pixels=0, cache_dir=tmp_path)
        filtered = SemanticFolder(root, "train", "all", min_pixels=2048, cache_dir=tmp_path)
    assert len(every.class_ids) == 80 and every.class_names[1] == "person"
    assert sum(1 for c in every.class_ids if every.samples_by_class[c]) == 71
    assert len(every.samples_by_class[1]) == 61
    assert {every.class_names[c]: len(every.samples_by_class[c]) for c in (3, 42, 61)} == {
        "car": 12, "cup": 10, "dining_table": 10}
    assert len(every.image_keys()) == 126  # 2 of the 128 images hold background only
    assert every.num_pairs() == 362
    assert len(filtered.samples_by_class[1]) == 51 and filtered.num_pairs() == 258
    image, mask = every.load(every.samples_by_class[1][0], 1)
    assert image.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 1, 255} and (mask == 1).any()


def test_real_camvid_splits(shared_data, tmp_path):
    root = shared_data / "semantic" / "camvid"
    sizes = {}
    for split in ("train", "val", "test"):
        bench = SemanticFolder(root, split, "all", min_pixels=0, cache_dir=tmp_path)
        sizes[split] = len(bench.image_keys())
    assert sizes == {"train": 184, "val": 50, "test": 117}
    assert bench.class_names[0] == "sky" and len(bench.class_ids) == 11  # 0 is a class here, not background
    assert len(bench.samples_by_class[0]) == 116 and len(bench.samples_by_class[10]) == 39  # sky, bicyclist
    image, mask = bench.load(bench.samples_by_class[0][0], 0)
    assert image.shape == (360, 480, 3) and mask.shape == (360, 480)
    assert set(np.unique(mask)) == {0, 1, 255}  # unlabelled pixels stay ignore
