"""The stage-1 config schema. Defaults are the paper's / MoCo-v2's recipe; see configs/pretrain/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import field
from common.run import check_trackers
from superpixels.segment import SuperpixelConfig
from superpixels.transforms import PhotometricConfig


@dataclass
class DataConfig:
    source: Literal["builtin", "folder", "voc", "coco"] = field(
        "builtin", help="builtin: scikit-image's sample photos (no download); folder: every image under root; "
                        "voc: root/JPEGImages filtered by list_file; coco: root/train2014 (or train2017)")
    root: str = field("", help="dataset root (ignored for builtin)")
    list_file: str = field("", help="voc: image ids to use (default: the PFENet train list shipped with the project); "
                                    "folder: image paths relative to root, one per line (default: every image "
                                    "under root), e.g. from `python -m finetune.list_images`")
    num_workers: int = field(2, help="data-loader worker processes per rank")
    min_image_side: int = field(64, help="images whose short side is smaller are bad input")
    on_bad_image: Literal["error", "skip"] = field(
        "error", help="error: stop naming the file; skip: leave it out, count it and list it in the run folder")
    builtin_dir: str = field("", help="where the builtin images are materialised (default: <out_dir>/builtin_images)")
    augment_on: Literal["auto", "worker", "device"] = field(
        "auto", help="worker: loader workers decode and augment with PIL (lightly / torchvision); device: workers "
                     "only decode onto a canvas and draw each view's parameters, the views are cut and coloured "
                     "batched on the accelerator (pretrain/device_views.py); auto: device on CUDA, worker on CPU")
    decode_on: Literal["worker", "device"] = field(
        "worker", help="augment_on=device only: worker decodes in the loader; device sends the JPEG bytes and "
                       "torchvision decodes the batch on the accelerator (nvJPEG on CUDA); every image must be a JPEG")
    canvas_side: int = field(512, help="augment_on=device: images are shrunk to fit a canvas of this side (never "
                                       "enlarged) so a batch is one tensor; crops are drawn in the image's pixels")

    def validate(self) -> None:
        if self.source != "builtin" and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")
        if self.canvas_side < 32:
            raise ValueError(f"data.canvas_side must be >= 32 pixels, got {self.canvas_side}")
        if self.num_workers < 0:  # the DataLoader would only refuse it after the dataset is prepared
            raise ValueError(f"data.num_workers must be >= 0 (0 = load in the main process), got {self.num_workers}")


@dataclass
class AugConfig:
    global_size: int = field(224, help="global view size (MoCo-v2: 224)")
    local_size: int = field(112, help="patch view size for loss.local_mode=patch (spec: 112)")
    min_scale: float = field(0.2, help="RandomResizedCrop lower scale bound")
    hflip_prob: float = field(0.5, help="horizontal flip probability")
    photometric: PhotometricConfig = field(PhotometricConfig(), help="colour jitter / grayscale / blur (MoCo-v2)")

    def validate(self) -> None:
        for key, size in (("aug.global_size", self.global_size), ("aug.local_size", self.local_size)):
            if size < 1:  # would only fail when the first image is cropped
                raise ValueError(f"{key} must be >= 1 pixel, got {size}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"aug.min_scale must be in (0, 1] (a fraction of the image area), got {self.min_scale}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"aug.hflip_prob must be a probability in [0, 1], got {self.hflip_prob}")


@dataclass
class ModelConfig:
    arch: Literal["resnet50", "resnet18", "mobilenet_v2"] = field("resnet50", help="prior-extractor backbone")
    init_weights: str = field("", help="optional torchvision-format state dict to start from (default: random)")
    head_hidden_dim: int = field(2048, help="projection-head hidden width (MoCo-v2: 2048)")
    out_dim: int = field(128, help="embedding dimension (MoCo-v2: 128)")
    momentum: float = field(0.999, help="key-encoder EMA momentum")
    bn_mode: Literal["auto", "shuffle", "split", "plain"] = field(
        "auto", help="auto: shuffle-BN across processes when there are several, split-BN on one process; "
                     "plain: no protection (ablation only)")
    split_bn_splits: int = field(8, help="SplitBatchNorm splits (per-process batch must be divisible)")

    def validate(self) -> None:
        if self.split_bn_splits < 1:
            raise ValueError(f"model.split_bn_splits must be >= 1 (1 = plain BatchNorm), got {self.split_bn_splits}")
        for key, dim in (("model.head_hidden_dim", self.head_hidden_dim), ("model.out_dim", self.out_dim)):
            if dim < 1:
                raise ValueError(f"{key} must be >= 1, got {dim}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"model.momentum must be in [0, 1] (key-encoder EMA), got {self.momentum}")


@dataclass
class LossConfig:
    global_weight: float = field(1.0, help="w_g; 0 turns the global loss off (local-only ablation)")
    local_weight: float = field(1.0, help="w_l; 0 turns the local loss off (global-only = plain MoCo-v2)")
    local_mode: Literal["patch", "pooled"] = field(
        "patch", help="patch: a superpixel's box is cropped and encoded as two extra views (the paper); "
                      "pooled: encoder features mask-pooled per superpixel shared by both views (DetCon-style)")
    pooled_regions: int = field(4, help="pooled mode: superpixels sampled per image and view pair")
    temperature: float = field(0.2, help="InfoNCE temperature for both losses (MoCo-v2: 0.2)")

    def validate(self) -> None:
        for key, weight in (("loss.global_weight", self.global_weight), ("loss.local_weight", self.local_weight)):
            if weight < 0:  # a negative weight would silently maximise the loss
                raise ValueError(f"{key} must be >= 0 (0 turns that loss off), got {weight}")
        if self.global_weight <= 0 and self.local_weight <= 0:
            raise ValueError("loss.global_weight and loss.local_weight cannot both be 0")
        if self.temperature <= 0:  # logits / 0 -> inf / nan loss, no error
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.local_mode == "pooled" and self.local_weight > 0 and self.pooled_regions < 1:
            raise ValueError(f"loss.pooled_regions must be >= 1 with loss.local_mode=pooled, got {self.pooled_regions}")


@dataclass
class QueueConfig:
    global_size: int = field(65536, help="global key queue length")
    local_size: int = field(65536, help="local (superpixel) key queue length")


@dataclass
class OptimConfig:
    base_lr: float = field(0.03, help="lr for a global batch of 256; scaled linearly with the real global batch")
    momentum: float = field(0.9, help="SGD momentum")
    weight_decay: float = field(1e-4, help="SGD weight decay")
    schedule: Literal["cosine", "constant"] = field("cosine", help="cosine decay to 0 over the run, no warm-up")
    implementation: Literal["auto", "fused", "foreach", "loop"] = field(
        "auto", help="torch SGD kernel: fused (one kernel for all parameters), foreach (batched per step) or loop; "
                     "auto: fused on CUDA, foreach elsewhere")

    def validate(self) -> None:  # torch.optim.SGD refuses these too, but only once the model is built
        for key, value in (("optim.base_lr", self.base_lr), ("optim.momentum", self.momentum),
                           ("optim.weight_decay", self.weight_decay)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")


@dataclass
class TrainConfig:
    batch_size: int = field(32, help="images per process per step (global batch = this x processes)")
    epochs: int = field(200, help="passes over the data")
    max_steps: int = field(0, help="stop after this many steps (0 = epochs decide)")
    seed: int = field(0, help="seed of everything: sampling, augmentation, initialisation")
    deterministic: bool = field(False, help="deterministic kernels (slower); needed for bit-exact resume checks")
    checkpoint_every: int = field(500, help="save a checkpoint every N steps (and at the end)")
    keep_last: int = field(3, help="checkpoints kept (0 = all)")
    log_every: int = field(10, help="scalars to TensorBoard / metrics.jsonl every N steps")
    trackers: list[str] = field(["tensorboard"], help="accelerate trackers (log_with): tensorboard, wandb, mlflow, "
                                                     "aim, comet_ml, clearml, dvclive when installed; [] = none")
    out_dir: str = field("runs/pretrain", help="parent folder of run folders")
    run_name: str = field("", help="run folder name (default: the config file's stem)")
    export_at_end: bool = field(True, help="write the prior-extractor export (key encoder) when training ends")
    mixed_precision: Literal["launcher", "no", "bf16", "fp16"] = field(
        "launcher", help="autocast through accelerate: launcher = what `accelerate launch --mixed_precision` (or its "
                         "config) says; bf16 on Ampere / Hopper GPUs; the InfoNCE logits and the queues stay float32")
    memory_format: Literal["auto", "channels_last", "contiguous"] = field(
        "auto", help="channels_last (NHWC) for the encoders and the views: faster convolutions on tensor cores; "
                     "auto: channels_last with CUDA unless BatchNorm is split (one process), which needs NCHW")
    compile: bool = field(False, help="torch.compile the two encoders (in place: checkpoints keep their keys)")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1 (images per process per step), got {self.batch_size}")
        if self.max_steps < 0:
            raise ValueError(f"train.max_steps must be >= 0 (0 = train.epochs decide), got {self.max_steps}")
        if self.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.max_steps == 0 and self.epochs < 1:  # 0 steps: the run would end at once without a checkpoint
            raise ValueError(f"train.epochs must be >= 1 when train.max_steps=0, got train.epochs={self.epochs}")
        # the engine tests `step % every`: 0 would be a ZeroDivisionError at the first step
        if self.checkpoint_every < 1:
            raise ValueError(f"train.checkpoint_every must be >= 1 step (a checkpoint is also written at the end), "
                             f"got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1 step, got {self.log_every}")
        if self.keep_last < 0:
            raise ValueError(f"train.keep_last must be >= 0 (0 = keep all), got {self.keep_last}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
            raise ValueError(f"train.seed must be in [0, 2**32), got {self.seed}")
        check_trackers(self.trackers)


@dataclass
class PretrainConfig:
    data: DataConfig = field(DataConfig())
    superpixels: SuperpixelConfig = field(SuperpixelConfig())
    aug: AugConfig = field(AugConfig())
    model: ModelConfig = field(ModelConfig())
    loss: LossConfig = field(LossConfig())
    queue: QueueConfig = field(QueueConfig())
    optim: OptimConfig = field(OptimConfig())
    train: TrainConfig = field(TrainConfig())

    def validate(self) -> None:
        m, t = self.model, self.train
        # SplitBatchNorm reshapes [B, C, H, W] to [B / splits, C * splits, H, W]: an indivisible batch fails at the
        # first forward. bn_mode=auto picks split BN on one process (shuffle BN on several), so it is checked too.
        if m.bn_mode in ("split", "auto") and m.split_bn_splits > 1 and t.batch_size % m.split_bn_splits:
            hint = " (or model.bn_mode=shuffle for a run on several processes)" if m.bn_mode == "auto" else ""
            raise ValueError(
                f"train.batch_size={t.batch_size} is not divisible by model.split_bn_splits={m.split_bn_splits}, "
                f"which model.bn_mode={m.bn_mode} needs (split BatchNorm divides each process's batch); choose a "
                f"batch size that is a multiple of the splits or a split count that divides it{hint}")
        queues = (("queue.global_size", self.queue.global_size, self.uses_global),
                  ("queue.local_size", self.queue.local_size, self.uses_local))
        for key, size, used in queues:
            if used and size < 1:  # the queue is only built (and refuses the size) once training starts
                raise ValueError(f"{key} must be >= 1 while its loss is on, got {size}")

    @property
    def uses_local(self) -> bool:
        return self.loss.local_weight > 0

    @property
    def uses_global(self) -> bool:
        return self.loss.global_weight > 0
