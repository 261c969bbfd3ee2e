"""The three query cues of QGNet: prior region map, guided region map, category guider.

Cosine similarity is ``a.b / (|a| |b| + eps)`` with eps added to the *product* of the norms, as in the
reference code. Similarities are computed in float32 even under autocast: min-max normalisation with
eps 1e-7 of half-precision cosines would quantise the maps to a few hundred levels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

COSINE_EPS = 1e-7
AREA_EPS = 5e-4


def _cosine_matrix(target: Tensor, source: Tensor, eps: float) -> Tensor:
    """``[B,C,N], [B,C,M] -> [B,M,N]`` cosines (eps on the product of norms)."""
    dots = torch.bmm(source.transpose(1, 2), target)
    norms = torch.bmm(source.norm(dim=1, keepdim=True).transpose(1, 2), target.norm(dim=1, keepdim=True))
    return dots / (norms + eps)


def masked_max_cosine(target: Tensor, source: Tensor, eps: float = COSINE_EPS, chunk: int = 0) -> Tensor:
    """For every target pixel, its highest cosine to any source pixel of the same sample.

    Args:
        target: ``[B,C,N]`` (e.g. query pixels).
        source: ``[B,C,M]`` (e.g. masked support or prior pixels); zero vectors score cosine 0.
        eps: added to the product of the two norms.
        chunk: 0 = one ``[B,M,N]`` matrix (the reference; kept for backward). ``k > 0`` = find the best
            source pixel for ``k`` target pixels at a time without autograd, then recompute only the chosen
            pairs with autograd: the same values and the same gradient (that of the selected maximum), with
            memory ``O(B*M*k)`` instead of ``O(B*M*N)``.

    Returns:
        ``[B,N]`` float32 maxima.
    """
    if target.shape[:2] != source.shape[:2]:
        raise ValueError(f"target {tuple(target.shape)} and source {tuple(source.shape)} differ in batch/channels")
    with torch.autocast(target.device.type, enabled=False):
        target, source = target.float(), source.float()
        if chunk <= 0:
            return _cosine_matrix(target, source, eps).max(dim=1).values
        with torch.no_grad():
            best = torch.cat([_cosine_matrix(target[:, :, i:i + chunk], source, eps).max(dim=1).indices
                              for i in range(0, target.shape[2], chunk)], dim=1)  # [B,N] source index
        chosen = torch.gather(source, 2, best.unsqueeze(1).expand(-1, source.shape[1], -1))  # [B,C,N]
        return (target * chosen).sum(1) / (target.norm(dim=1) * chosen.norm(dim=1) + eps)


def minmax_normalize(s: Tensor, eps: float = COSINE_EPS) -> Tensor:
    """Per-sample ``(s - min) / (max - min + eps)``: ``[B,N] -> [B,N]`` in [0, 1]."""
    low = s.min(dim=1, keepdim=True).values
    high = s.max(dim=1, keepdim=True).values
    return (s - low) / (high - low + eps)


def projection(in_channels: int, out_channels: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """The prior map's trainable projection (``down_learn_super/unsuper``): 3x3 conv (no bias) + ReLU + Dropout2d."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.ReLU(inplace=True), nn.Dropout2d(dropout))


def _region_map(target: Tensor, source: Tensor, chunk: int) -> Tensor:
    if target.shape[-2:] != source.shape[-2:]:
        raise ValueError(f"feature maps differ in size: {tuple(target.shape)} vs {tuple(source.shape)}")
    s = masked_max_cosine(target.flatten(2), source.flatten(2), chunk=chunk)
    return minmax_normalize(s).view(target.shape[0], 1, *target.shape[-2:])


def prior_region_map(bridge_l4: Tensor, prior_l4: Tensor, proj_bridge: nn.Module | None,
                     proj_prior: nn.Module | None, chunk: int = 0) -> Tensor:
    """Prior region map Mp: per bridge pixel, the max cosine to the query's own prior-extractor pixels.

    Args:
        bridge_l4: frozen feature-extractor layer4 of the query ``[B,C,h,w]``.
        prior_l4: frozen prior-extractor layer4 of the same query ``[B,C',h,w]``.
        proj_bridge, proj_prior: trainable projections (:func:`projection`) applied first, gradients flow
            through the max and the min-max into both; ``None`` = raw features (paper-literal, C == C').
        chunk: see :func:`masked_max_cosine`.

    Returns:
        ``[B,1,h,w]`` in [0, 1], min 0 and max ~1 per sample (low on objects per the paper; not inverted).
    """
    bridge = proj_bridge(bridge_l4) if proj_bridge is not None else bridge_l4
    prior = proj_prior(prior_l4) if proj_prior is not None else prior_l4
    return _region_map(bridge, prior, chunk)


@torch.no_grad()
def guided_region_map(query_l4: Tensor, support_l4_masked: Tensor, chunk: int = 0) -> Tensor:
    """PFENet's prior mask Mg: per query pixel, the max cosine to the foreground support pixels.

    Args:
        query_l4: frozen query layer4 ``[B,C,h,w]``.
        support_l4_masked: support layer4 times the support mask ``[B,C,h,w]`` (background = zero vectors).

    Returns:
        ``[B,1,h,w]`` in [0, 1], min-max normalised per sample, no gradient.
    """
    return _region_map(query_l4, support_l4_masked, chunk)


def weighted_gap(feat: Tensor, mask: Tensor, eps: float = AREA_EPS) -> Tensor:
    """Category guider: masked average pooling ``sum(f*m) / (sum(m) + eps)``.

    Args:
        feat: ``[B,C,h,w]``; mask: ``[B,1,h,w]`` (soft, in [0, 1]).

    Returns:
        ``[B,C,1,1]`` prototype.
    """
    return (feat * mask).sum(dim=(2, 3), keepdim=True) / (mask.sum(dim=(2, 3), keepdim=True) + eps)
