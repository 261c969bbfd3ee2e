"""``model.method=prototype``: a training-free masked-average-prototype baseline (PANet without its loss).

On a frozen feature map (``model.prototype_layer`` of the stage-2 backbone, layer3 by default) each support
gives a foreground and a background prototype by masked average pooling (the support mask resized bilinearly
to the feature size, 255 counting as neither); k shots average their prototypes. Every query pixel scores
``scale * cos(feature, prototype)`` against both, and the prediction is the argmax: no parameter is learned,
so any learned method's table shows what it adds over no learning.

    query [B,3,S,S] -> F_q [B,C,h,w];  supports [B,K,3,S,S] -> F_s [B,K,C,h,w]
    P_fg, P_bg = mean_k MAP(F_s, m_k), MAP(F_s, 1 - m_k)      [B,C]
    logits = scale * [cos(F_q, P_bg), cos(F_q, P_fg)]       [B,2,h,w] -> bilinear [B,2,S,S]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.segmenter import SegmenterOutput
from finetune.methods.base import FewShotMethod, register
from finetune.model.backbones import FrozenBackbone, build_backbone
from finetune.model.config import ModelConfig

AREA_EPS = 5e-4  # a support with (almost) no background pixel gives a near-zero prototype, not NaN


def masked_average(features: Tensor, weights: Tensor, eps: float = AREA_EPS) -> Tensor:
    """``features [B,C,h,w]``, ``weights [B,1,h,w]`` in [0, 1] -> ``[B,C]`` weighted mean over pixels."""
    return (features * weights).sum((2, 3)) / (weights.sum((2, 3)) + eps)


def prototype_logits(query: Tensor, fg: Tensor, bg: Tensor, scale: float) -> Tensor:
    """``query [B,C,h,w]``, prototypes ``[B,C]`` -> ``[B,2,h,w]`` scaled cosines (background, foreground)."""
    q = F.normalize(query.float(), dim=1)
    protos = F.normalize(torch.stack([bg, fg], dim=1).float(), dim=2)  # [B,2,C]
    return scale * torch.einsum("bkc,bchw->bkhw", protos, q)


class PrototypeBaseline(FewShotMethod):
    """Masked-average prototypes on a frozen backbone tap; no trainable parameter.

    Args:
        backbone: the frozen stride-8 trunk.
        layer: which tap: ``layer2``, ``layer3``, ``layer4`` or ``layer3+layer4`` (concatenated).
        scale: cosine temperature (PANet's 20); it changes the probability maps, never the argmax.
    """

    def __init__(self, backbone: FrozenBackbone, layer: str = "layer3", scale: float = 20.0) -> None:
        super().__init__()
        self.backbone, self.layer, self.scale = backbone, layer, scale

    def features(self, x: Tensor) -> Tensor:
        """``[N,3,S,S] -> [N,C,h,w]`` the configured tap (h = (S-1)/8+1)."""
        taps = dict(zip(("layer2", "layer3", "layer4"), self.backbone(x)))
        if self.layer == "layer3+layer4":
            return torch.cat([taps["layer3"], taps["layer4"]], dim=1)
        return taps[self.layer]

    def encode_query(self, query: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``query [B,3,S,S]`` -> (features ``[B,C,h,w]``, input size)."""
        return self.features(query), tuple(query.shape[-2:])

    def encode_supports(self, supports: Tensor, support_masks: Tensor) -> tuple[Tensor, Tensor]:
        """-> (foreground, background) prototypes ``[B,C]``, each the mean over the K shots."""
        b, k = supports.shape[:2]
        fs = self.features(supports.flatten(0, 1))                              # [B*K,C,h,w]
        masks = support_masks.flatten(0, 1).unsqueeze(1)                        # [B*K,1,S,S]
        size = fs.shape[-2:]
        fg_w = F.interpolate((masks == 1).float(), size=size, mode="bilinear", align_corners=True)
        bg_w = F.interpolate((masks == 0).float(), size=size, mode="bilinear", align_corners=True)
        return masked_average(fs, fg_w).view(b, k, -1).mean(1), masked_average(fs, bg_w).view(b, k, -1).mean(1)

    def decode(self, query: tuple[Tensor, tuple[int, int]], supports: tuple[Tensor, Tensor]) -> SegmenterOutput:
        """Scaled cosines to both prototypes; ``maps["similarity"]`` is the foreground probability ``[B,1,h,w]``."""
        (fq, size), (fg, bg) = query, supports
        b = fq.shape[0]
        logits = prototype_logits(fq, fg.expand(b, -1), bg.expand(b, -1), self.scale)  # [B,2,h,w]
        similarity = logits.softmax(dim=1)[:, 1:]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return SegmenterOutput(logits=logits, maps={"similarity": similarity})


@register("prototype")
def build_prototype(cfg: ModelConfig) -> PrototypeBaseline:
    """The baseline on ``model.backbone`` with ``model.backbone_weights`` (``model.prior`` is not read)."""
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.deep_stem, freeze_bn_stats=True)
    return PrototypeBaseline(backbone, cfg.prototype_layer, cfg.prototype_scale)
