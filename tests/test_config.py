from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from common.config import ConfigError, build, dump_yaml, field, flatten, load_config, parse_overrides


@dataclass
class Inner:
    lr: float = field(0.1, help="learning rate")
    steps: int = field(10)
    mode: Literal["a", "b"] = field("a")
    sizes: list[int] = field([1, 2])


@dataclass
class Outer:
    name: str = field("x")
    flag: bool = field(False)
    inner: Inner = field(Inner())
    maybe: int | None = field(None)


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides():
    cfg = load_config(Outer, None, ["inner.lr=0.5", "inner.sizes=[3,4,5]", "flag=true", "maybe=3"])
    assert cfg.inner.lr == 0.5 and cfg.inner.sizes == [3, 4, 5] and cfg.flag is True and cfg.maybe == 3
    assert cfg.inner.steps == 10 and cfg.name == "x"


def test_int_is_accepted_for_float():
    assert load_config(Outer, None, ["inner.lr=1"]).inner.lr == 1.0


def test_base_inheritance_child_wins_and_lists_replace(tmp_path):
    write(tmp_path / "base.yaml", {"name": "base", "inner": {"lr": 0.2, "sizes": [9, 9, 9]}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "inner": {"sizes": [1]}})
    cfg = load_config(Outer, child, ["inner.steps=3"])
    assert cfg.name == "base" and cfg.inner.lr == 0.2 and cfg.inner.sizes == [1] and cfg.inner.steps == 3


@pytest.mark.parametrize("override,match", [
    (["inner.lrr=1"], r"unknown config key 'inner.lrr' \(did you mean 'inner.lr'\?\)"),
    (["inner.steps=1.5"], r"'inner.steps' expects an integer"),
    (["flag=maybe"], r"'flag' expects true or false"),
    (["inner.mode=c"], r"'inner.mode' expects one of 'a', 'b'"),
    (["inner=3"], r"'inner' must be a mapping"),
    (["inner.sizes=[1,x]"], r"'inner.sizes\[1\]' expects an integer"),
])
def test_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, None, override)


def test_unknown_key_in_file_names_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"inner": {"stepz": 1}})
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'inner.stepz'"):
        load_config(Outer, bad)


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, tmp_path / "a.yaml")


def test_dump_round_trip_and_flatten():
    cfg = load_config(Outer, None, ["inner.sizes=[7]", "name=y"])
    again = build(Outer, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["inner.lr"] == 0.1 and flat["inner.sizes"] == "[7]" and flat["name"] == "y"


def test_override_value_parsing():
    assert parse_overrides(["a.b=1", "c=x", "d=[1, 2]", "e="]) == {"a": {"b": 1}, "c": "x", "d": [1, 2], "e": ""}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["novalue"])


def test_real_pretrain_configs_load(repo_root):
    from pretrain.config import PretrainConfig
    for path in sorted((repo_root / "configs" / "pretrain").glob("*.yaml")):
        load_config(PretrainConfig, path)  # every shipped config must validate


def test_trackers_are_a_config_choice_checked_before_the_run():
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    for schema in (PretrainConfig, FinetuneConfig):
        assert load_config(schema, None, []).train.trackers == ["tensorboard"]
        assert load_config(schema, None, ["train.trackers=[]"]).train.trackers == []
        with pytest.raises(ConfigError, match="train.trackers: unknown tracker 'tensorbord'"):
            load_config(schema, None, ["train.trackers=[tensorbord]"])


def test_overrides_may_come_before_and_after_the_config_file(tmp_path):
    from common.cli import parse_run_args
    from finetune.config import FinetuneConfig

    config = tmp_path / "c.yaml"
    config.write_text("shot: 1\n")
    inv = parse_run_args(FinetuneConfig, ["eval.seeds=[0]", "--config", str(config), "model.method=pfenet"],
                         prog="run", default_config=None)
    assert inv.cfg.eval.seeds == [0] and inv.cfg.model.method == "pfenet"
