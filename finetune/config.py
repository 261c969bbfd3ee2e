"""The stage-2 config schema: ``data.*`` comes from :mod:`fewshot.data.config`, ``model.*`` from
:mod:`finetune.model.config`; optimiser, training and evaluation keys are defined here.

Defaults follow the reference PASCAL-5i recipe (PFENet's training schedule, QGNet's evaluation); see
configs/finetune/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import field
from common.run import check_trackers
from fewshot.data.config import DataConfig
from fewshot.evaluate import EvalSpec
from finetune.model.config import ModelConfig


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = field(
        "sgd", help="sgd: the reference optimiser; adamw: for short CPU runs, where the reference SGD schedule "
                    "sits at chance for the first few hundred steps (the PFENet head has no BatchNorm)")
    lr: float = field(0.025, help="effective learning rate: the reference code's 0.0025 times its scale_lr=10 quirk")
    schedule: Literal["poly", "step"] = field(
        "poly", help="poly: PFENet's per-iteration decay; step: lr / 10 at each of optim.milestones (SSP's schedule)")
    power: float = field(0.9, help="poly decay lr * (1 - it / max_it) ** power, per iteration")
    milestones: list[float] = field(
        [1 / 3, 2 / 3], help="step schedule: fractions of the run's steps at which the lr is divided by 10")
    momentum: float = field(0.9, help="SGD momentum (ignored by adamw)")
    weight_decay: float = field(1e-4, help="weight decay (SGD's L2 term; AdamW's decoupled decay)")


@dataclass
class TrainConfig:
    batch_size: int = field(4, help="episodes per process per step (reference: 4 on one GPU)")
    epochs: int = field(200, help="passes; an epoch is train.episodes_per_epoch episodes")
    episodes_per_epoch: int = field(0, help="0 = one episode per (image, class) pair of the train split")
    max_steps: int = field(0, help="stop after this many steps (0 = epochs decide)")
    seed: int = field(321, help="seed of sampling, augmentation and initialisation (reference: 321)")
    deterministic: bool = field(False, help="deterministic kernels (slower); needed for bit-exact resume checks")
    checkpoint_every: int = field(500, help="save a checkpoint every N steps (and at the end)")
    keep_last: int = field(2, help="checkpoints kept (0 = all)")
    log_every: int = field(20, help="scalars to TensorBoard / metrics.jsonl every N steps")
    val_every: int = field(2, help="validate every N epochs on the held-out split of the *training* classes "
                                   "(never the test classes) and keep the best weights (0 = never)")
    val_episodes: int = field(1000, help="validation episodes")
    val_at_start: bool = field(False, help="also validate the untrained model before the first step, so that model "
                                           "selection can keep the starting point (with model.residual it "
                                           "is the training-free baseline: training must beat it to be kept)")
    max_skipped: float = field(0.1, help="with data.on_bad_sample=skip: the run fails when more than this share "
                                         "of its training episodes was skipped as bad input")
    trackers: list[str] = field(["tensorboard"], help="accelerate trackers (log_with): tensorboard, wandb, mlflow, "
                                                     "aim, comet_ml, clearml, dvclive when installed; [] = none")
    out_dir: str = field("runs/finetune", help="parent folder of run folders")
    run_name: str = field("", help="run folder name (default: <config stem>_fold<k>_<shot>shot)")
    # --- FS-CS (issue 14, finetune/fscs.py) ---
    task: Literal["fss", "fscs"] = field(
        "fss", help="fss: 1-way episodes, the method's own loss; fscs: iFSL classify-and-segment training on 1-way "
                    "episodes whose support class is absent from the query half the time (finetune.fscs)")
    labels: Literal["strong", "weak"] = field(
        "strong", help="with train.task=fscs: strong = masks, the merged (1+N)-way NLL; weak = class tags only, "
                       "NLL(mean over pixels of the probabilities, presence)")
    # --- end FS-CS ---
    stage: Literal["fss", "base"] = field(
        "fss", help="fss: the method's episodic training; base: BAM's base stage (model.method=bam): its base learner "
                    "as a semantic segmenter of the training classes + background, saved as <run>/last_model."
                    "safetensors for the meta stage's model.base_learner (finetune/base_stage.py)")

    def validate(self) -> None:
        """Reject values that cannot work (ValueError naming the key)."""
        if self.stage == "base" and self.task != "fss":
            raise ValueError("train.stage=base trains a semantic segmenter; train.task must be fss")
        if self.labels == "weak" and self.task != "fscs":
            raise ValueError("train.labels=weak needs train.task=fscs (FS-S training has masks only)")
        for key in ("batch_size", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("epochs", "episodes_per_epoch", "max_steps", "val_every", "val_episodes", "keep_last"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0")
        if not 0.0 <= self.max_skipped < 1.0:
            raise ValueError(f"train.max_skipped={self.max_skipped} must be in [0, 1)")
        check_trackers(self.trackers)


@dataclass
class EvalConfig:
    protocol: Literal["pfenet", "hsnet"] = field(
        "pfenet", help="pfenet: aspect-preserving resize + pad, logits upsampled to the original label; "
                       "hsnet: square resize, scored at the input size")
    episodes: int = field(1000, help="test episodes per seed (PFENet test.py used 5,000)")
    seeds: list[int] = field([321], help="one evaluation per seed; reported as mean +- std")
    shot: int = field(0, help="shots at evaluation (0 = the training shot)")
    split: Literal["test", "val"] = field("test", help="test: the fold's novel classes")
    batch_size: int = field(1, help="episodes per forward")
    num_workers: int = field(2, help="loader workers (episodes do not depend on it)")
    vis_episodes: int = field(8, help="PNG grids for the first N episodes of the first seed")
    recall_thresholds: list[float] = field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                                           help="region-map recall analysis (paper Table 7); [] = off")
    max_skipped: float = field(0.1, help="with data.on_bad_sample=skip: an evaluation with a larger share of "
                                         "skipped (bad) episodes is an error, never a number")
    compare_with: list[str] = field(
        ["prototype"], help="training-free methods evaluated on the same episodes after the method, side by side in "
                            "<eval dir>/table.md (what learning adds over no learning); [] = none")
    episodes_file: str = field("", help="evaluate exactly the episodes of this saved list (an episodes_*.json "
                                        "written next to earlier results) instead of drawing them")
    out_dir: str = field("", help="where results go (default: <run dir>/eval)")
    support_tuning: int = field(
        0, help="test-time support tuning: Adam steps per episode on the supports themselves (support-as-query), "
                "trainable parameters only, restored after every episode; 0 = off (finetune/support_tuning.py)")
    support_tuning_lr: float = field(1e-4, help="learning rate of eval.support_tuning")
    label: str = field("", help="the row name of these results in tables (default: model.method), e.g. to tell two "
                                "qgnet variants apart in `python -m fewshot.report`")
    # --- FS-CS (issue 14, fewshot/fscs.py) ---
    task: Literal["fss", "fscs", "gfss"] = field(
        "fss", help="fss: few-shot segmentation (1 way, the class is in the query); fscs: iFSL few-shot "
                    "classification and segmentation: eval.way support classes, each present in the query with "
                    "probability 1/2; scored by ER (every presence call right) and mIoU; gfss: generalized FSS "
                    "(model.method=bam): the base classes and the episode's novel class together, mIoU over base, "
                    "novel and their harmonic mean (finetune/gfss.py)")
    way: int = field(1, help="support classes per episode with eval.task=fscs (N-way); 1 with eval.task=fss")
    # --- end FS-CS ---

    def validate(self) -> None:
        """Reject values that cannot work (ValueError naming the key)."""
        if self.support_tuning < 0 or self.support_tuning_lr <= 0:
            raise ValueError("eval.support_tuning must be >= 0 steps and eval.support_tuning_lr > 0")
        if self.support_tuning and self.task != "fss":
            raise ValueError("eval.support_tuning is an FS-S option (eval.task=fss); FS-CS / GFSS episodes are not "
                             "tuned")
        if self.way < 1 or (self.task == "fss" and self.way != 1):
            raise ValueError(f"eval.way={self.way} must be >= 1, and 1 unless eval.task=fscs")
        if self.episodes < 0 or self.shot < 0 or self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("eval.episodes and eval.shot must be >= 0, eval.batch_size >= 1, eval.num_workers >= 0")
        if not self.seeds:
            raise ValueError("eval.seeds must list at least one seed")
        if not 0.0 <= self.max_skipped < 1.0:
            raise ValueError(f"eval.max_skipped={self.max_skipped} must be in [0, 1)")
        from finetune.methods import METHODS  # the registry imports the model config, not this module

        unknown = [m for m in self.compare_with if m not in METHODS]
        if unknown:
            raise ValueError(f"eval.compare_with: {unknown[0]!r} is not a registered method ({', '.join(METHODS)})")


@dataclass
class FinetuneConfig:
    data: DataConfig = field(DataConfig())
    model: ModelConfig = field(ModelConfig())
    optim: OptimConfig = field(OptimConfig())
    train: TrainConfig = field(TrainConfig())
    eval: EvalConfig = field(EvalConfig())
    shot: int = field(1, help="support images per episode during training")

    def validate(self) -> None:
        if self.shot < 1:
            raise ValueError(f"shot={self.shot} must be >= 1")
        if self.model.text_guidance and "fscs" in (self.train.task, self.eval.task):
            raise ValueError("model.text_guidance reads the episode's class name: FS-CS episodes (train.task / "
                             "eval.task = fscs) do not pass one")
        if self.model.meta_memory and self.train.task == "fscs":  # its losses need the FS-S loss's query mask
            raise ValueError("model.meta_memory trains with train.task=fss only (FS-CS training has no MMT losses)")
        if self.model.method == "bam" and self.model.kshot not in (1, self.shot):
            raise ValueError(f"model.kshot={self.model.kshot} must be 1 or the training shot ({self.shot}): the k-shot "
                             "reweighting is trained on episodes of that many shots")
        if self.eval.task == "gfss" and self.model.method != "bam":
            raise ValueError(f"eval.task=gfss needs a base learner (model.method=bam), not {self.model.method!r}")
        if self.train.stage == "base" and self.model.method != "bam":
            raise ValueError(f"train.stage=base is BAM's base stage; model.method is {self.model.method!r}")


def eval_spec(cfg: FinetuneConfig) -> EvalSpec:
    """The evaluation protocol the config asks for (``eval.*`` with the data's size, order and bad-input rule)."""
    ec = cfg.eval
    return EvalSpec(shot=ec.shot or cfg.shot, episodes=ec.episodes, protocol=ec.protocol, size=cfg.data.eval_size,
                    query_order=cfg.data.query_order, on_bad_sample=cfg.data.on_bad_sample,
                    max_skipped=ec.max_skipped, batch_size=ec.batch_size, num_workers=ec.num_workers)
