"""Several datasets as one source of episodes, and class splits that never leak (fewshot.data.sources)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError, load_config
from common.errors import DataError
from fewshot.data.config import DataConfig
from fewshot.data.episodes import make_episodes
from fewshot.data.loader import EpisodeDataset
from fewshot.data.sources import KEY_SEP, MultiSource, build_splits, normalise_name, rank_by_hash
from fewshot.data.transforms import EvalTransform


def write_fss(root: Path, classes: dict[str, int], size: int = 24) -> Path:
    """An FSS-1000-layout folder: ``classes`` name -> number of images, a square object in each."""
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
            mask = np.zeros((size, size), np.uint8)
            mask[4:16, 4:16] = 255
            Image.fromarray(mask).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def two_sets(tmp_path: Path) -> tuple[Path, Path]:
    a = write_fss(tmp_path / "a", {"ant": 3, "bee": 3, "Dining Table": 3, "cup": 3})
    b = write_fss(tmp_path / "b", {"fox": 6, "owl": 6, "dining_table": 4, "yak": 6, "elk": 6})
    return a, b


def sources(a: Path, b: Path, a_classes: str, b_classes: str, *extra: str) -> DataConfig:
    entry = "{{name: {n}, benchmark: fss1000, root: {r}, fss_classes: {c}}}"
    value = f"[{entry.format(n='a', r=a, c=a_classes)}, {entry.format(n='b', r=b, c=b_classes)}]"
    return load_config(DataConfig, None, [f"sources={value}", *extra])


def test_names_compare_across_datasets():
    assert normalise_name("Dining Table") == normalise_name("dining_table") == normalise_name("dining-table")
    assert rank_by_hash(["x", "y", "z"], 0) == rank_by_hash(["z", "y", "x"], 0)  # order-independent


def test_two_sources_join_with_prefixed_keys_and_per_source_tests(two_sets):
    a, b = two_sets
    cfg = sources(a, b, "{train: [ant, bee], test: [cup]}", "{train: [fox, owl, yak], test: [elk]}")
    splits = build_splits(cfg, need_val=False)
    assert isinstance(splits.train, MultiSource) and splits.val is None
    assert sorted(splits.train.class_names.values()) == ["a:ant", "a:bee", "b:fox", "b:owl", "b:yak"]
    assert set(splits.test) == {"a", "b"} and splits.test["b"].class_names == {1: "elk"}
    episodes = make_episodes(splits.train, 1, 50, seed=0, query_order="random")
    for e in episodes:  # an episode never mixes sources
        source = e.query.split(KEY_SEP)[0]
        assert all(k.split(KEY_SEP)[0] == source for k in e.supports)
        assert splits.train.class_names[e.class_id].startswith(source + ":")
    # by default in proportion to the (image, class) pairs: a has 6, b has 18 -> 12.5 / 37.5, the tie to the first
    assert Counter(e.query.split(KEY_SEP)[0] for e in episodes) == {"a": 13, "b": 37}
    item = EpisodeDataset(splits.train, episodes[:1], EvalTransform(25), 1)[0]
    assert item["query"].shape == (3, 25, 25) and (item["query_mask"] == 1).any()
    assert make_episodes(splits.train, 1, 50, seed=0, query_order="random") == episodes  # pure function of the seed


def test_weights_set_the_share_of_each_source(two_sets):
    a, b = two_sets
    cfg = sources(a, b, "{train: [ant, bee], test: [cup]}", "{train: [fox, owl], test: [elk]}")
    cfg.sources[0]["weight"], cfg.sources[1]["weight"] = 3.0, 1.0
    splits = build_splits(cfg, need_val=False)
    counts = Counter(e.query.split(KEY_SEP)[0] for e in make_episodes(splits.train, 1, 40, 1, "random"))
    assert counts == {"a": 30, "b": 10}


def test_a_class_in_train_of_one_source_and_test_of_another_is_an_error(two_sets):
    a, b = two_sets
    cfg = sources(a, b, "{train: [ant, Dining Table], test: [cup]}", "{train: [fox], test: [dining_table]}")
    with pytest.raises(DataError, match=r"class 'dining_table' is a train class \(in a\) and a test class \(in b\)"):
        build_splits(cfg, need_val=False)


def test_validation_classes_are_held_out_of_every_source(two_sets):
    a, b = two_sets
    cfg = sources(a, b, "{train: [ant, bee, Dining Table], test: [cup]}", "{train: [fox, dining_table, owl], "
                  "test: [elk]}", "val_classes=[dining_table]")
    splits = build_splits(cfg)
    assert sorted(splits.val.class_names[c] for c in splits.val.class_ids) == ["a:Dining Table", "b:dining_table"]
    assert not any("dining" in n.lower() for n in (splits.train.class_names[c] for c in splits.train.class_ids))
    fraction = build_splits(sources(a, b, "{train: [ant, bee], test: [cup]}", "{train: [fox, owl, yak], "
                                    "test: [elk]}", "val_class_fraction=0.4"))
    assert len(fraction.val.class_ids) == 2 and len(fraction.train.class_ids) == 3  # round(0.4 * 5) held out


def test_unknown_validation_class_and_bad_sources_are_named(two_sets, tmp_path):
    a, b = two_sets
    with pytest.raises(DataError, match="data.val_classes: 'zebra' is not a training class"):
        build_splits(sources(a, b, "{train: [ant], test: [cup]}", "{train: [fox], test: [elk]}",
                             "val_classes=[zebra]"))
    with pytest.raises(ConfigError, match=r"data.sources\[1\] needs a 'name'"):
        load_config(DataConfig, None, [f"sources=[{{name: a, root: {a}}}, {{root: {b}}}]"])
    with pytest.raises(ConfigError, match=r"name 'a' is used twice"):
        load_config(DataConfig, None, [f"sources=[{{name: a, root: {a}}}, {{name: a, root: {b}}}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(a\).*unknown config key 'fss_clases'"):
        load_config(DataConfig, None, [f"sources=[{{name: a, root: {a}, fss_clases: {{}}}}]"])
    with pytest.raises(DataError, match="missing"):
        build_splits(load_config(DataConfig, None, [f"sources=[{{name: gone, benchmark: fss1000, "
                                                    f"root: {tmp_path / 'nowhere'}, fss_classes: {{train: [x]}}}}]"]))


def test_a_training_only_source_has_no_test_split(two_sets):
    a, b = two_sets
    value = (f"[{{name: a, benchmark: fss1000, root: {a}, fss_classes: {{train: [ant, bee]}}, test: false}}, "
             f"{{name: b, benchmark: fss1000, root: {b}, fss_classes: {{train: [fox], test: [elk]}}}}]")
    splits = build_splits(load_config(DataConfig, None, [f"sources={value}"]), need_val=False)
    assert set(splits.test) == {"b"} and len(splits.train.class_ids) == 3


def test_a_test_only_source_gives_no_training_or_validation_class(two_sets):
    a, b = two_sets
    value = (f"[{{name: a, benchmark: fss1000, root: {a}, fss_classes: {{train: [ant, bee], test: [cup]}}}}, "
             f"{{name: b, benchmark: fss1000, root: {b}, fss_classes: {{train: [fox, owl], test: [elk]}}, "
             f"train: false}}]")
    splits = build_splits(load_config(DataConfig, None, [f"sources={value}", "val_classes=[bee]"]))
    def names(bench):
        return {bench.class_names[c] for c in bench.class_ids}

    assert names(splits.train) == {"a:ant"} and names(splits.val) == {"a:bee"}
    assert set(splits.test) == {"a", "b"}  # b still gives test episodes


def test_every_source_test_only_is_a_config_error(two_sets):
    a, b = two_sets
    value = (f"[{{name: a, benchmark: fss1000, root: {a}, train: false}}, "
             f"{{name: b, benchmark: fss1000, root: {b}, train: false}}]")
    with pytest.raises(ConfigError, match="every source has train: false"):
        build_splits(load_config(DataConfig, None, [f"sources={value}"]))
