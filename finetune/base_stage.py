"""BAM's base stage (``train.stage=base``): train the base learner as a semantic segmenter, through the same
run scaffold and training loop as every stage-2 run.

    accelerate launch finetune/run.py --config configs/finetune/pascal5i_r50_bam_base.yaml   # train.stage=base

The training set is every image of the training split once per epoch (``train.episodes_per_epoch`` > 0: that
many, wrapping around), labelled with the base classes (:mod:`fewshot.data.base_labels`: one channel per training
class name, novel classes -> background), augmented by the episodes' transform. The stage has no validation and
no few-shot evaluation: its product is ``<run>/last_model.safetensors`` (with the class -> channel table in its
metadata), which the meta stage loads with ``model.base_learner=<run>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from torch import Tensor

from fewshot.data.base import FewShotBenchmark
from fewshot.data.base_labels import BaseLabelDataset, base_channels, base_collate, epoch_images
from fewshot.data.sources import build_splits
from finetune.config import FinetuneConfig
from finetune.methods.bam import BaseLearner, build_base_learner


def base_train_dataset(cfg: FinetuneConfig, train_set: FewShotBenchmark, channel_of: dict[int, int],
                       transform: Callable, epoch: int, count: int) -> tuple[BaseLabelDataset, Callable]:
    """One epoch of base-stage training images (order a function of ``train.seed + epoch``) and its collate."""
    keys = epoch_images(train_set, cfg.train.seed, epoch, count)
    return (BaseLabelDataset(train_set, keys, channel_of, transform, cfg.train.seed, epoch, cfg.data.on_bad_sample),
            base_collate)


def base_train_step(model: Callable, core: BaseLearner, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward one collated batch (``image [B,3,S,S]``, ``label [B,S,S]``) and the base learner's cross-entropy."""
    return core.loss(model(batch["image"]), batch["label"])


def run_base_stage(cfg: FinetuneConfig, accelerator: Accelerator, run_dir: Path, resume: str | None,
                   allow_inexact: bool) -> dict[str, Any]:
    """Index the training split, build the base learner over its classes, train it; returns where it went."""
    from finetune.engine import LAST, train  # the engine imports this module's step functions

    splits = build_splits(cfg.data, need_train=True, need_val=False)
    channel_of = base_channels(splits.train)
    model = build_base_learner(cfg.model, channel_of)
    n_train = sum(p.numel() for p in model.trainable_parameters())
    accelerator.print(f"base stage: {max(channel_of.values())} base classes + background over "
                      f"{len(splits.train.image_keys())} images of {splits.train}\n"
                      f"parameters: {n_train:,} trained of {sum(p.numel() for p in model.parameters()):,}")
    result = train(cfg, accelerator, model, run_dir, splits.train, None, resume, allow_inexact)
    weights = run_dir / LAST
    accelerator.print(f"base learner: {weights}\nnext: the meta stage with model.base_learner={run_dir}")
    return {"stage": "base", "weights": str(weights), "step": result.step, "base_classes": max(channel_of.values())}
