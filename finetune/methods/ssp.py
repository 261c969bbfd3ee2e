"""``model.method=ssp``: self-support prototypes (SSP, Fan et al., ECCV 2022): the query matched against itself.

The support prototypes find the query's most confident pixels; those pixels, pooled from the query's *own*
features, become self-support prototypes that look like the query object (same instance, same lighting),
and the query is matched again against a mix of both. Shape walk (``model.prototype_layer``, layer3 by
default; h = (S-1)/8+1, N = h*h):

    F_q [B,C,h,w]; FP, BP = mean_k MAP(F_s, m_k), MAP(F_s, 1 - m_k)            [B,C]
    out0 = 10 * [cos(F_q, BP), cos(F_q, FP)]                                   [B,2,h,w]
    self_support(F_q, softmax(out0)_fg): fg pixels p > 0.7, bg pixels p_bg > 0.6 (else the top 12)
        SSFP = mean fg pixels [B,C]; SSBP = mean bg pixels [B,C]
        ASBP = softmax_j(2 cos(F_q(i), bg_j)) @ bg_j   (per query pixel i)     [B,C,h,w]
    FP1 = 0.5 FP + 0.5 SSFP;  BP1 = 0.3 SSBP + 0.7 ASBP;  out1 = 10 cos(F_q, FP1 | BP1)
    refinement (model.ssp_refine): the same from softmax(out1), then
    FP2 = 0.5 FP + 0.2 FP1 + 0.3 (0.5 FP + 0.5 SSFP'), BP2 likewise;  out = 0.7 out2 + 0.3 out1

Training (``model.train_layers``, the reference trains layer2/3) minimises ``CE(out2) + CE(out1) +
CE(query self-matching) + 0.2 CE(support self-matching)``: the last two match each image against the
prototypes of its own ground truth, which keeps the features prototype-friendly. With no trained layer the
method is training-free and is evaluated like ``prototype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.segmenter import SegmenterOutput
from finetune.methods.base import FewShotMethod, register
from finetune.methods.prototype import masked_average
from finetune.model.backbones import FrozenBackbone, build_backbone
from finetune.model.config import ModelConfig

SCALE = 10.0            # cosine temperature of every SSP logit
FG_THRESHOLD = 0.7      # query pixels above this foreground probability support the foreground
BG_THRESHOLD = 0.6      # ... above this background probability support the background
FALLBACK_PIXELS = 12    # when no pixel passes a threshold, its most confident pixels do
LOCAL_SCALE = 2.0       # temperature of the per-pixel (adaptive) background prototype
SUPPORT_WEIGHT = 0.2    # weight of the support self-matching loss


def cosine_logits(features: Tensor, fg: Tensor, bg: Tensor, scale: float = SCALE) -> Tensor:
    """``features [B,C,h,w]``; prototypes ``[B,C]`` or per pixel ``[B,C,h,w]`` -> ``[B,2,h,w]`` (bg, fg)."""
    def per_pixel(p: Tensor) -> Tensor:
        return p[..., None, None] if p.dim() == 2 else p

    features = features.float()
    sims = [F.cosine_similarity(features, per_pixel(p).float(), dim=1) for p in (bg, fg)]
    return scale * torch.stack(sims, dim=1)


def confident_pixels(prob: Tensor, threshold: float, fallback: int = FALLBACK_PIXELS) -> Tensor:
    """``prob [B,N]`` -> ``[B,N]`` 0/1 selection: pixels with ``prob > threshold``, or, in an episode where
    none passes, its ``fallback`` most probable pixels (the reference's top-12)."""
    selected = prob > threshold
    empty = ~selected.any(dim=1)
    if empty.any():
        top = prob[empty].topk(min(fallback, prob.shape[1]), dim=1).indices
        selected[empty] = torch.zeros_like(selected[empty]).scatter_(1, top, True)
    return selected.float()


def self_support(features: Tensor, fg_prob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The query's self-support prototypes.

    Args:
        features: ``[B,C,h,w]`` query features.
        fg_prob: ``[B,h,w]`` foreground probability of a first matching (background = ``1 - fg_prob``).

    Returns:
        ``SSFP [B,C]`` (mean of confident foreground pixels), ``SSBP [B,C]`` (mean of confident background
        pixels), ``ASBP [B,C,h,w]`` (per pixel, the confident background pixels weighted by
        ``softmax(2 * cos)`` to it).
    """
    b, c, h, w = features.shape
    flat = features.float().flatten(2)                                   # [B,C,N]
    prob = fg_prob.float().flatten(1)                                    # [B,N]
    fg_sel = confident_pixels(prob, FG_THRESHOLD)
    bg_sel = confident_pixels(1 - prob, BG_THRESHOLD)
    ssfp = (flat * fg_sel[:, None]).sum(2) / fg_sel.sum(1, keepdim=True)
    ssbp = (flat * bg_sel[:, None]).sum(2) / bg_sel.sum(1, keepdim=True)
    unit = F.normalize(flat, dim=1)
    sim = LOCAL_SCALE * torch.bmm(unit.transpose(1, 2), unit)            # [B,N(query),N(bg candidates)]
    weights = sim.masked_fill(bg_sel[:, None] == 0, float("-inf")).softmax(dim=2)
    asbp = torch.bmm(flat, weights.transpose(1, 2)).view(b, c, h, w)      # [B,C,h,w]
    return ssfp, ssbp, asbp


def ssp_match(features: Tensor, fg: Tensor, bg: Tensor, refine: bool = True) -> dict[str, Tensor]:
    """The SSP matching of query ``features [B,C,h,w]`` with support prototypes ``fg, bg [B,C]``.

    Returns:
        ``{"out0", "out1", "out"}`` logits ``[B,2,h,w]`` (support-only, first self-support, final) and
        ``fg1 [B,C]`` / ``bg1 [B,C,h,w]``, the first round's mixed prototypes (the maps ``qgnet`` can use).
    """
    out0 = cosine_logits(features, fg, bg)
    ssfp, ssbp, asbp = self_support(features, out0.softmax(dim=1)[:, 1])
    fg1 = 0.5 * fg.float() + 0.5 * ssfp
    bg1 = 0.3 * ssbp[..., None, None] + 0.7 * asbp
    out1 = cosine_logits(features, fg1, bg1)
    out = out1
    if refine:
        ssfp, ssbp, asbp = self_support(features, out1.softmax(dim=1)[:, 1])
        fg2 = 0.5 * fg.float() + 0.2 * fg1 + 0.3 * (0.5 * fg.float() + 0.5 * ssfp)
        bg2 = 0.5 * bg.float()[..., None, None] + 0.2 * bg1 + 0.3 * (0.3 * ssbp[..., None, None] + 0.7 * asbp)
        out = 0.7 * cosine_logits(features, fg2, bg2) + 0.3 * out1
    return {"out0": out0, "out1": out1, "out": out, "fg1": fg1, "bg1": bg1}


def support_prototypes(features: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """``features [N,C,h,w]``, ``masks [N,S,S]`` (0/1/255) -> fg, bg prototypes ``[N,C]`` (255 is neither)."""
    size = features.shape[-2:]
    fg = F.interpolate((masks == 1).unsqueeze(1).float(), size=size, mode="bilinear", align_corners=True)
    bg = F.interpolate((masks == 0).unsqueeze(1).float(), size=size, mode="bilinear", align_corners=True)
    return masked_average(features, fg), masked_average(features, bg)


class SSP(FewShotMethod):
    """Self-support prototype matching on one backbone tap; trains only the backbone stages it is given.

    Args:
        backbone: the stride-8 trunk (its ``train_layers`` are what trains).
        layer: the tap (``layer2`` | ``layer3``).
        refine: the second self-support round of the reference's ``refine=True``.
    """

    def __init__(self, backbone: FrozenBackbone, layer: str = "layer3", refine: bool = True) -> None:
        super().__init__()
        if layer not in ("layer2", "layer3"):
            raise ValueError(f"model.prototype_layer: ssp matches on layer2 or layer3, not {layer!r}")
        self.backbone, self.layer, self.refine = backbone, layer, refine

    def features(self, x: Tensor) -> Tensor:
        """``[N,3,S,S] -> [N,C,h,w]`` the configured tap."""
        x2, x3 = self.backbone.to_layer3(x)
        return x3 if self.layer == "layer3" else x2

    def encode_query(self, query: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``query [B,3,S,S]`` -> (features ``[B,C,h,w]``, input size)."""
        return self.features(query), tuple(query.shape[-2:])

    def encode_supports(self, supports: Tensor, support_masks: Tensor) -> dict[str, Tensor]:
        """-> ``fg, bg [B,C]`` (mean over shots); in training also each shot's self-matching logits."""
        b, k = supports.shape[:2]
        fs = self.features(supports.flatten(0, 1))                               # [B*K,C,h,w]
        masks = support_masks.flatten(0, 1)                                       # [B*K,S,S]
        fg, bg = support_prototypes(fs, masks)
        state = {"fg": fg.view(b, k, -1).mean(1), "bg": bg.view(b, k, -1).mean(1)}
        if self.training:
            state["support_logits"] = cosine_logits(fs, fg, bg)                   # [B*K,2,h,w]
            state["support_masks"] = masks
        return state

    def decode(self, query: tuple[Tensor, tuple[int, int]], supports: dict[str, Tensor]) -> SegmenterOutput:
        """Logits ``[B,2,S,S]``; maps: the support-only ``similarity`` and the ``self_support`` answer."""
        (fq, size), b = query, query[0].shape[0]
        match = ssp_match(fq, supports["fg"].expand(b, -1), supports["bg"].expand(b, -1), self.refine)
        maps = {"similarity": match["out0"].softmax(dim=1)[:, 1:], "self_support": match["out"].softmax(dim=1)[:, 1:]}
        up = [F.interpolate(match[k], size=size, mode="bilinear", align_corners=True) for k in ("out", "out1")]
        out = SegmenterOutput(logits=up[0], maps=maps, aux_logits=[up[1]] if self.refine else [])
        if self.training:
            out.loss_inputs = {"query_features": fq, **{k: supports[k] for k in ("support_logits", "support_masks")}}
        return out

    def loss(self, out: SegmenterOutput, target: Tensor,
             classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``CE(out) + CE(out1) + CE(query self-matching) + 0.2 CE(support self-matching)`` (+ 2 * the
        DR-Adapters' cyclic loss with ``model.adapter=dr``)."""
        return self.add_adapter_loss(*ssp_loss(out, target))


def ssp_loss(out: SegmenterOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """SSP's training loss; ``target [B,S,S]`` (0 / 1 / 255). The self-matching terms match the query (and each
    support) against the prototypes of its own ground truth."""
    size, target = target.shape[-2:], target.long()

    def ce(logits: Tensor, labels: Tensor) -> Tensor:
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return F.cross_entropy(up, labels, ignore_index=255)

    main = F.cross_entropy(out.logits, target, ignore_index=255)
    parts = {"main": main}
    if out.aux_logits:
        parts["first"] = F.cross_entropy(out.aux_logits[0], target, ignore_index=255)
    extra = out.loss_inputs
    fq = extra["query_features"]
    parts["self"] = ce(cosine_logits(fq, *support_prototypes(fq, target)), target)
    parts["support"] = ce(extra["support_logits"], extra["support_masks"].long())
    total = sum(v for k, v in parts.items() if k != "support") + SUPPORT_WEIGHT * parts["support"]
    return total, {k: v.detach() for k, v in parts.items()}


@register("ssp")
def build_ssp(cfg: ModelConfig) -> SSP:
    """SSP on ``model.backbone``; ``model.train_layers`` (e.g. ``[layer2, layer3]``) trains, none = training-free."""
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.deep_stem, freeze_bn_stats=True,
                              train_layers=tuple(cfg.train_layers), adapter=cfg.adapter)
    return SSP(backbone, cfg.prototype_layer, cfg.ssp_refine)
