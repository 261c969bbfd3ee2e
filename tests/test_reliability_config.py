"""Stage-1 config values that would otherwise fail late (or silently) are refused at load time, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from pretrain.config import PretrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def load(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, list(overrides))


@pytest.mark.parametrize("overrides, names", [
    (["train.batch_size=0"], ["train.batch_size"]),
    (["train.batch_size=-4"], ["train.batch_size"]),
    (["train.checkpoint_every=0"], ["train.checkpoint_every"]),
    (["train.log_every=0"], ["train.log_every"]),
    (["train.epochs=-1"], ["train.epochs"]),
    (["train.epochs=0"], ["train.epochs", "train.max_steps=0"]),
    (["train.max_steps=-1"], ["train.max_steps"]),
    (["train.keep_last=-1"], ["train.keep_last"]),
    (["train.seed=-1"], ["train.seed"]),
    (["data.num_workers=-1"], ["data.num_workers"]),
    (["aug.global_size=0"], ["aug.global_size"]),
    (["aug.local_size=0"], ["aug.local_size"]),
    (["aug.min_scale=0"], ["aug.min_scale"]),
    (["aug.hflip_prob=1.5"], ["aug.hflip_prob"]),
    (["model.split_bn_splits=0"], ["model.split_bn_splits"]),
    (["model.out_dim=0"], ["model.out_dim"]),
    (["model.head_hidden_dim=0"], ["model.head_hidden_dim"]),
    (["model.momentum=1.5"], ["model.momentum"]),
    (["loss.temperature=0"], ["loss.temperature"]),
    (["loss.local_weight=-1"], ["loss.local_weight"]),
    (["loss.local_mode=pooled", "loss.pooled_regions=0"], ["loss.pooled_regions"]),
    (["queue.global_size=0"], ["queue.global_size"]),
    (["queue.local_size=0"], ["queue.local_size"]),
    (["optim.base_lr=-0.1"], ["optim.base_lr"]),
    (["optim.weight_decay=-1"], ["optim.weight_decay"]),
])
def test_invalid_value_names_the_key(overrides, names):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("bn_mode", ["split", "auto"])
def test_batch_not_divisible_by_split_bn_names_both_keys_and_values(bn_mode):
    with pytest.raises(ConfigError) as err:
        load(f"model.bn_mode={bn_mode}", "model.split_bn_splits=8", "train.batch_size=12")
    message = str(err.value)
    assert "train.batch_size=12" in message and "model.split_bn_splits=8" in message
    assert f"model.bn_mode={bn_mode}" in message


@pytest.mark.parametrize("overrides", [
    ["model.bn_mode=shuffle", "model.split_bn_splits=8", "train.batch_size=12"],  # split BN never used
    ["model.bn_mode=plain", "model.split_bn_splits=8", "train.batch_size=12"],
    ["model.bn_mode=split", "model.split_bn_splits=1", "train.batch_size=3"],  # 1 split = plain BatchNorm
    ["model.bn_mode=split", "model.split_bn_splits=4", "train.batch_size=12"],
    ["loss.local_weight=0", "queue.local_size=0"],  # the local queue is not built without the local loss
    ["train.epochs=0", "train.max_steps=5"],  # max_steps decides
    ["train.keep_last=0", "loss.local_mode=pooled"],
])
def test_valid_combinations_load(overrides):
    load(*overrides)


def test_defaults_and_shipped_configs_still_validate():
    load()
    for path in sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml")):
        load_config(PretrainConfig, path)


def test_error_names_the_source_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.log_every"):
        load_config(PretrainConfig, path)
