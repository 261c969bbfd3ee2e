"""Config keys of the QGNet model (``model.*``): backbones, their weights, the prior, the FEM head.

Defaults are the reference PASCAL-5i model (spec §3.1-3.2, §8 rows 8-12): a frozen ResNet-50 feature
extractor, a frozen stage-1 ResNet-50 prior, learned 3x3 projections for the prior region map, bins 60/30/15/8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import field


@dataclass
class ModelConfig:
    backbone: Literal["resnet50", "resnet101", "mobilenet_v2"] = field(
        "resnet50", help="frozen feature extractor F (bridge and support features), dilated to output stride 8")
    backbone_weights: str = field(
        "weights/resnet50_imagenet.pth",
        help="ImageNet weights of the backbone: a torchvision-format state dict (.safetensors or .pth); "
             "'torchvision' = torchvision's IMAGENET1K_V1 enum (needs the network); "
             "'random' = random init (smoke tests only, must be asked for)")
    deep_stem: bool = field(
        False, help="PSPNet deep-stem ResNet (3x 3x3 convs 64,64,128) as in PFENet's resnet50_v2.pth; "
                    "set it only when backbone_weights are such a file")
    prior: str = field(
        "prior_r50.safetensors",
        help="stage-1 prior extractor exported by `python -m pretrain.export` (torchvision state dict); "
             "'none' = the PFENet baseline through the same code; 'random' = random init (smoke tests only)")
    prior_arch: Literal["resnet50", "resnet18", "mobilenet_v2"] = field(
        "resnet50", help="architecture of the exported prior (must match the stage-1 model.arch)")
    paper_literal: bool = field(
        False, help="prior map from the raw cosine of the frozen layer4 features (the paper's text) instead of "
                    "the reference code's trainable 3x3 projections; needs equal channel counts")
    bins: list[float] = field(
        [60, 30, 15, 8], help="FEM pyramid bins: absolute sizes, or fractions of the feature size when all <= 1 "
                              "(COCO: [1.0, 0.5, 0.25, 0.125])")
    reduce_dim: int = field(256, help="channels of the head (bridge, prototype, FEM)")
    aux_weight: float = field(1.0, help="weight of the mean auxiliary (per-bin) cross-entropy")
    freeze_bn_stats: bool = field(
        False, help="false = reference behaviour: frozen backbones still run BatchNorm in train mode (batch "
                    "statistics, running stats drift); true = BatchNorm always in eval mode")
    sim_chunk: int = field(
        0, help="0 = full [N x N] cosine matrix per sample (reference); >0 = max-cosine in chunks of this many "
                "query pixels, bounding memory at large inputs (same values)")
    dropout: float = field(0.5, help="Dropout2d after the 1x1 bridge reductions and the 3x3 prior projections")

    def validate(self) -> None:
        """Reject combinations that cannot build (raises ValueError naming the key)."""
        if not self.bins or any(b <= 0 for b in self.bins):
            raise ValueError(f"model.bins must be a non-empty list of positive numbers, got {self.bins}")
        if any(b <= 1 for b in self.bins) and not all(b <= 1 for b in self.bins):
            raise ValueError(f"model.bins mixes relative (<= 1) and absolute sizes: {self.bins}")
        if not all(b <= 1 for b in self.bins) and any(b != int(b) for b in self.bins):
            raise ValueError(f"absolute model.bins must be whole numbers, got {self.bins}")
        if self.deep_stem and self.backbone == "mobilenet_v2":
            raise ValueError("model.deep_stem is a ResNet option; model.backbone is mobilenet_v2")
        if self.deep_stem and self.backbone_weights == "torchvision":
            raise ValueError("torchvision has no deep-stem ResNet weights: set model.deep_stem=false or give a "
                             "PSPNet-style state dict in model.backbone_weights")
        if self.paper_literal and self.prior == "none":
            raise ValueError("model.paper_literal changes the prior map, but model.prior is 'none'")
        if self.reduce_dim <= 0 or self.sim_chunk < 0 or self.aux_weight < 0:
            raise ValueError("model.reduce_dim must be > 0, model.sim_chunk and model.aux_weight >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
