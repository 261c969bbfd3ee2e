"""PFENet's Feature Enrichment Module (FEM) and classifier, the trainable decoder of QGNet.

Per bin b (finest first): pool the bridge features to b x b, concatenate the expanded prototype and the
region maps resized to b x b, merge (1x1), add the inter-scale path from the previous (finer) bin
(alpha), refine (beta, residual), predict auxiliary logits; then concatenate all bins at full feature
resolution and classify. No BatchNorm anywhere (PFENet issue #77).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resolve_bins(bins: list[float], size: int) -> list[int]:
    """Absolute bins as given; relative ones (all <= 1) as ``int(size * b)`` like PFENet (13 * 0.125 -> 1)."""
    out = [int(size * b) if all(x <= 1 for x in bins) else int(b) for b in bins]
    if min(out) < 1:
        raise ValueError(f"bins {bins} give an empty pyramid level at feature size {size}; use a larger input")
    return out


def conv_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    """``k x k`` convolution (no bias, same size) + ReLU, as a list to splice into an ``nn.Sequential``."""
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]


def classifier_head(dim: int, classes: int) -> nn.Sequential:
    """PFENet's classifier: 3x3 conv + ReLU + Dropout2d(0.1) + 1x1 conv to ``classes``."""
    return nn.Sequential(*conv_relu(dim, dim, 3), nn.Dropout2d(0.1), nn.Conv2d(dim, classes, 1))


class FEM(nn.Module):
    """FEM + final classifier.

    Args:
        bins: absolute bin sizes or fractions of the feature height (see :func:`resolve_bins`).
        num_maps: region maps concatenated per bin (2 for QGNet: guided + prior; 1 for PFENet).
        dim: channels of the bridge features and the prototype.
        classes: output classes (background, foreground).
        with_features: ``False`` = decode from the region maps alone (bridge and prototype are not read): a head
            that sees no appearance feature cannot memorise the training classes' looks.
    """

    def __init__(self, bins: list[float], num_maps: int, dim: int = 256, classes: int = 2,
                 with_features: bool = True) -> None:
        super().__init__()
        self.bins, self.with_features = list(bins), with_features
        n = len(self.bins)
        cin = (2 * dim if with_features else 0) + num_maps
        self.init_merge = nn.ModuleList(nn.Sequential(*conv_relu(cin, dim, 1)) for _ in range(n))
        self.alpha_conv = nn.ModuleList(nn.Sequential(*conv_relu(2 * dim, dim, 1)) for _ in range(n - 1))
        self.beta_conv = nn.ModuleList(
            nn.Sequential(*conv_relu(dim, dim, 3), *conv_relu(dim, dim, 3)) for _ in range(n))
        self.inner_cls = nn.ModuleList(classifier_head(dim, classes) for _ in range(n))
        self.res1 = nn.Sequential(*conv_relu(n * dim, dim, 1))
        self.res2 = nn.Sequential(*conv_relu(dim, dim, 3), *conv_relu(dim, dim, 3))
        self.cls = classifier_head(dim, classes)

    def forward(self, query: Tensor | None, prototype: Tensor | None,
                maps: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode.

        Args:
            query: bridge features ``[B,D,h,w]`` (None without ``with_features``).
            prototype: category guider ``[B,D,1,1]`` (None without ``with_features``).
            maps: region maps, each ``[B,1,h,w]``, in concatenation order (guided, then prior).

        Returns:
            logits ``[B,classes,h,w]`` and one auxiliary ``[B,classes,b,b]`` per bin.
        """
        size = maps[0].shape[-2:]
        pyramid, aux = [], []
        for j, b in enumerate(resolve_bins(self.bins, size[0])):
            maps_b = [F.interpolate(m, size=(b, b), mode="bilinear", align_corners=True) for m in maps]
            features = [F.adaptive_avg_pool2d(query, b), prototype.expand(-1, -1, b, b)] if self.with_features else []
            x = torch.cat([*features, *maps_b], dim=1)
            x = self.init_merge[j](x)                                       # [B,D,b,b]
            if j > 0:
                finer = F.interpolate(pyramid[-1], size=(b, b), mode="bilinear", align_corners=True)
                x = self.alpha_conv[j - 1](torch.cat([x, finer], dim=1)) + x
            x = self.beta_conv[j](x) + x
            aux.append(self.inner_cls[j](x))                               # [B,2,b,b]
            pyramid.append(F.interpolate(x, size=size, mode="bilinear", align_corners=True))
        x = self.res1(torch.cat(pyramid, dim=1))                           # [B,D,h,w]
        x = self.res2(x) + x
        return self.cls(x), aux
