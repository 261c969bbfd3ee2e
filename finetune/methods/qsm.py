"""``model.method=qsm``: query self-similarity prototyping (QSM, Visual Computer 2025), built on SSP + DR-Adapter.

The support prototypes only find the query's significant area; the final prototypes come from the query:

    out0 = 10 cos(F_q, FP | BP)                         significant area (as SSP)
    Pf1, Pb1, Pb2 = SSFP, SSBP, ASBP of self_support(F_q, softmax(out0)_fg)      [B,C], [B,C], [B,C,h,w]
    FSM   M_self = [cos(F_q, Pf1) >= 0.5];  Pf2 = MAP(F_q, M_self)               the query's own prototype
    ACAM  F_w = F_q * sigmoid(conv1d_k3(GAP(F_q)))                              an ECA-style channel gate
    APFM  per pixel, the fg winner of (Pf1, Pf2) where fg beats bg, the bg winner of (Pb1, Pb2) elsewhere;
          c1, c2 (c3, c4) = their vote fractions;  Pf = c1 (2 - g2) Pf1 + c2 g2 Pf2,
          Pb = c3 (2 - g4) Pb1 + c4 g4 Pb2  (g2, g4 learnable, 1 at start)
    out = 10 cos(F_w, Pf | Pb)

Loss: ``CE(out) + CE(query self-matching) + 0.2 CE(support self-matching) + 2 * the adapters' cyclic L1``
(SSP's terms without its first-round output). The reference's ACAM builds a new randomly initialised
Conv1d inside every forward pass, so its gate never trains; here it is one trained module, and its
convolution starts at zero (a uniform gate of 0.5, which leaves every cosine unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.segmenter import SegmenterOutput
from finetune.methods.base import register
from finetune.methods.prototype import masked_average
from finetune.methods.ssp import SSP, cosine_logits, self_support
from finetune.model.backbones import build_backbone
from finetune.model.config import ModelConfig

FSM_THRESHOLD = 0.5  # query pixels this similar to the self-support foreground form the query's own prototype
VOTE_EPS = 1e-6


def fsm_mask(features: Tensor, fg: Tensor) -> Tensor:
    """Foreground self-similar matching: ``features [B,C,h,w]``, ``fg [B,C]`` -> ``[B,1,h,w]`` 0/1 mask of
    ``cos >= 0.5``."""
    return (F.cosine_similarity(features.float(), fg[..., None, None].float(), dim=1) >= FSM_THRESHOLD).float()[:, None]


def vote_fractions(features: Tensor, pf1: Tensor, pf2: Tensor, pb1: Tensor, pb2: Tensor) -> Tensor:
    """APFM's contributions ``[B,4]`` = (c1, c2, c3, c4).

    Pixels where the best foreground cosine beats the best background one vote for the foreground prototype
    that wins there (``Pf1`` on ``>``, ``Pf2`` on ties); the other pixels vote among the background ones
    (``Pb1`` on ``>``, ``Pb2`` on ties). ``c1 = (n1 + eps) / (n1 + n2 + 2 eps)`` etc. Prototypes are ``[B,C]``
    or per pixel ``[B,C,h,w]``; ``features [B,C,h,w]``.
    """
    def cos(p: Tensor) -> Tensor:
        return F.cosine_similarity(features.float(), (p[..., None, None] if p.dim() == 2 else p).float(), dim=1)

    m1, m2, m3, m4 = cos(pf1), cos(pf2), cos(pb1), cos(pb2)
    fg_wins = (torch.maximum(m1, m2) >= torch.maximum(m3, m4)).float()
    n1, n2 = (fg_wins * (m1 > m2)).sum((1, 2)), (fg_wins * (m2 >= m1)).sum((1, 2))
    n3, n4 = ((1 - fg_wins) * (m3 > m4)).sum((1, 2)), ((1 - fg_wins) * (m4 >= m3)).sum((1, 2))
    fg_total, bg_total = n1 + n2 + 2 * VOTE_EPS, n3 + n4 + 2 * VOTE_EPS
    return torch.stack([(n1 + VOTE_EPS) / fg_total, (n2 + VOTE_EPS) / fg_total,
                        (n3 + VOTE_EPS) / bg_total, (n4 + VOTE_EPS) / bg_total], dim=1)


def apfm_fuse(c: Tensor, g2: Tensor, g4: Tensor, pf1: Tensor, pf2: Tensor, pb1: Tensor,
              pb2: Tensor) -> tuple[Tensor, Tensor]:
    """APFM's fusion: ``Pf = c1 (2 - g2) Pf1 + c2 g2 Pf2`` ``[B,C]``, ``Pb = c3 (2 - g4) Pb1 + c4 g4 Pb2``
    ``[B,C,h,w]`` (``Pb2`` per pixel); ``c [B,4]`` from :func:`vote_fractions`."""
    pf = c[:, 0:1] * (2 - g2) * pf1 + c[:, 1:2] * g2 * pf2
    pb = (c[:, 2:3] * (2 - g4) * pb1)[..., None, None] + c[:, 3:4, None, None] * g4 * pb2
    return pf, pb


class ChannelGate(nn.Module):
    """ACAM: ECA-style gate, ``x * sigmoid(conv1d_k(GAP(x)))`` with the 1-d convolution across adjacent channels."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.zeros_(self.conv.weight)  # gate 0.5 everywhere at start: cosines unchanged

    def forward(self, x: Tensor) -> Tensor:
        """``[B,C,h,w] -> [B,C,h,w]``."""
        gate = torch.sigmoid(self.conv(x.mean(dim=(2, 3))[:, None]))[:, 0]   # [B,C]
        return x * gate[..., None, None]


class QSM(SSP):
    """QSM on an (adapted) backbone tap; see the module docstring. ``g2``, ``g4`` and the gate train, with the
    DR-Adapters when ``model.adapter=dr`` and the stages in ``model.train_layers``."""

    def __init__(self, backbone, layer: str = "layer3") -> None:
        super().__init__(backbone, layer, refine=False)
        self.gate = ChannelGate()
        self.g2 = nn.Parameter(torch.ones(()))
        self.g4 = nn.Parameter(torch.ones(()))

    def decode(self, query: tuple[Tensor, tuple[int, int]], supports: dict[str, Tensor]) -> SegmenterOutput:
        """Logits ``[B,2,S,S]``; maps: the ``significant`` area, the ``fsm`` mask and the answer."""
        (fq, size), b = query, query[0].shape[0]
        fq = fq.float()
        out0 = cosine_logits(fq, supports["fg"].expand(b, -1), supports["bg"].expand(b, -1))
        pf1, pb1, pb2 = self_support(fq, out0.softmax(dim=1)[:, 1])
        m_self = fsm_mask(fq, pf1)
        pf2 = masked_average(fq, m_self)
        weighted = self.gate(fq)
        c = vote_fractions(weighted, pf1, pf2, pb1, pb2)
        pf, pb = apfm_fuse(c, self.g2, self.g4, pf1, pf2, pb1, pb2)
        logits = cosine_logits(weighted, pf, pb)
        maps = {"significant": out0.softmax(dim=1)[:, 1:], "fsm": m_self, "qsm": logits.softmax(dim=1)[:, 1:]}
        out = SegmenterOutput(logits=F.interpolate(logits, size=size, mode="bilinear", align_corners=True), maps=maps)
        if self.training:
            out.loss_inputs = {"query_features": fq, **{k: supports[k] for k in ("support_logits", "support_masks")}}
        return out


@register("qsm")
def build_qsm(cfg: ModelConfig) -> QSM:
    """QSM on ``model.backbone`` (``model.adapter=dr`` for the full method; ``model.init_from`` an SSP run)."""
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.deep_stem, freeze_bn_stats=True,
                              train_layers=tuple(cfg.train_layers), adapter=cfg.adapter)
    return QSM(backbone, cfg.prototype_layer)
