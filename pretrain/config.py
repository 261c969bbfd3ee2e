"""The stage-1 config schema. Defaults are the paper / MoCo-v2 recipe (spec §2.4); see configs/pretrain/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import field
from superpixels.segment import SuperpixelConfig
from superpixels.transforms import PhotometricConfig


@dataclass
class DataConfig:
    source: Literal["builtin", "folder", "voc", "coco"] = field(
        "builtin", help="builtin: scikit-image's sample photos (no download); folder: every image under root; "
                        "voc: root/JPEGImages filtered by list_file; coco: root/train2014 (or train2017)")
    root: str = field("", help="dataset root (ignored for builtin)")
    list_file: str = field("", help="voc: image ids to use (default: the PFENet train list shipped with the project)")
    num_workers: int = field(2, help="data-loader worker processes per rank")
    min_image_side: int = field(64, help="images whose short side is smaller are bad input")
    on_bad_image: Literal["error", "skip"] = field(
        "error", help="error: stop naming the file; skip: leave it out, count it and list it in the run folder")
    builtin_dir: str = field("", help="where the builtin images are materialised (default: <out_dir>/builtin_images)")

    def validate(self) -> None:
        if self.source != "builtin" and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")


@dataclass
class AugConfig:
    global_size: int = field(224, help="global view size (MoCo-v2: 224)")
    local_size: int = field(112, help="patch view size for loss.local_mode=patch (spec: 112)")
    min_scale: float = field(0.2, help="RandomResizedCrop lower scale bound")
    hflip_prob: float = field(0.5, help="horizontal flip probability")
    photometric: PhotometricConfig = field(PhotometricConfig(), help="colour jitter / grayscale / blur (MoCo-v2)")


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
        if self.global_weight <= 0 and self.local_weight <= 0:
            raise ValueError("loss.global_weight and loss.local_weight cannot both be 0")


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
    out_dir: str = field("runs/pretrain", help="parent folder of run folders")
    run_name: str = field("", help="run folder name (default: the config file's stem)")
    export_at_end: bool = field(True, help="write the prior-extractor export (key encoder) when training ends")


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

    @property
    def uses_local(self) -> bool:
        return self.loss.local_weight > 0

    @property
    def uses_global(self) -> bool:
        return self.loss.global_weight > 0
