"""DR-Adapter (Su et al., CVPR 2024): rectify a stage's feature style (channel statistics) towards the source's.

One adapter follows each of the first three backbone stages (layer0, layer1, layer2). For features
``x [B,C,H,W]`` with channel statistics ``mu, sigma [B,C,1,1]`` (spatial mean and standard deviation):

    training, p = 0.5 each:  local   x <- (1 + a) x - a mu + b mu          a, b ~ N(0, 0.75) per (sample, channel)
                             global  x <- (1 + a) x - a c + b c            c: EMA (0.99) of the source's mean style,
                                                                           a, b ~ N(0, 1.0)
    adapter(x) = 3 x [7x7 conv, dilation 2] with LayerNorm2d + ReLU between   ->  r [B,C,H,W]
    beta, alpha = spatial mean, spatial variance of r                        [B,C,1,1]
    rectified   = (x - mu) / sigma * (1 + alpha) sigma + (1 + beta) mu

so only the statistics change; a zero adapter output is the identity. The adapter reads ``x`` detached (its
gradient comes through the rectified features, i.e. through the frozen stages after it). At evaluation every
feature is rectified. The cyclic loss is the L1 distance between the statistics before perturbation and the
rectified ones, once after the rectification and once after perturbing the rectified features again with the
same noise and rectifying them a second time.

Differences from the public code, all stated in ``docs/methods.md``: the convolutions are padded (``same``
size: at 129 px MobileNetV2's stride-8 maps are 17 pixels wide, too small for three unpadded 7x7 dilated
convolutions); the query and the supports draw their own noise (they are encoded separately); the global
noise is drawn per step rather than per epoch; the EMA style starts from the first training batch instead of
a statistics-only epoch 0; the cyclic loss compares standard deviations (the public code's "sigma" is the
variance; the rectified features are the same either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOCAL_STD = 0.75      # local perturbation noise (the reference's local_noise_std)
GLOBAL_STD = 1.0      # global perturbation noise (the reference's global_noise_std)
PERTURB_P = 0.5       # each perturbation is applied with this probability per forward
STYLE_MOMENTUM = 0.99
STAT_EPS = 1e-6


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel: ``[B,C,H,W] -> [B,C,H,W]``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each pixel's channel vector, then scale and shift per channel."""
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[B,C,H,W] -> (mean, std)``, each ``[B,C,1,1]`` over the spatial positions."""
    return x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, unbiased=False)


def restyle(x: Tensor, mean: Tensor, std: Tensor, new_mean: Tensor, new_std: Tensor) -> Tensor:
    """``x`` with its channel statistics ``mean, std`` replaced by ``new_mean, new_std`` (all ``[B,C,1,1]``)."""
    return (x - mean) / (std + STAT_EPS) * new_std + new_mean


def perturb(x: Tensor, a: Tensor, b: Tensor, center: Tensor) -> Tensor:
    """``(1 + a) x - a c + b c``: scale the deviations from ``center [*,C,1,1]`` and shift the centre by ``b``."""
    return (1 + a) * x - a * center + b * center


class DRAdapter(nn.Module):
    """The domain-rectifying adapter of one stage (see the module docstring).

    Args:
        channels: channels of the stage's output.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers.append(nn.Conv2d(channels, channels, 7, padding=6, dilation=2))
            if i < 2:
                layers += [LayerNorm2d(channels), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        # the source's mean style, kept with the checkpoint (resume continues the same EMA)
        self.register_buffer("style_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("style_std", torch.zeros(1, channels, 1, 1))
        self.register_buffer("style_seen", torch.zeros((), dtype=torch.long))
        self.cyclic_terms: list[Tensor] = []  # filled by training forwards, emptied by pop_cyclic_loss
        self.links: list[Tensor] = []         # zero terms that keep every parameter in the graph (see forward)

    def rectify(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,C,H,W]`` -> (rectified features, their mean, their std ``[B,C,1,1]``)."""
        mean, std = channel_stats(x)
        r = self.net(x.detach())
        beta, alpha = r.mean(dim=(2, 3), keepdim=True), r.var(dim=(2, 3), keepdim=True, unbiased=False)
        new_mean, new_std = (1 + beta) * mean, (1 + alpha) * std
        return restyle(x, mean, std, new_mean, new_std), new_mean, new_std

    @torch.no_grad()
    def _update_style(self, mean: Tensor, std: Tensor) -> None:
        batch_mean, batch_std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        if int(self.style_seen) == 0:
            self.style_mean.copy_(batch_mean)
            self.style_std.copy_(batch_std)
        else:
            self.style_mean.mul_(STYLE_MOMENTUM).add_((1 - STYLE_MOMENTUM) * batch_mean)
            self.style_std.mul_(STYLE_MOMENTUM).add_((1 - STYLE_MOMENTUM) * batch_std)
        self.style_seen += 1

    def forward(self, x: Tensor) -> Tensor:
        """Evaluation: rectify. Training: perturb with p = 0.5 (local, global), rectify what was perturbed and
        record the cyclic loss; unperturbed features pass unchanged, as in the reference."""
        if not self.training:
            return self.rectify(x)[0]
        mean, std = channel_stats(x)
        self._update_style(mean.detach(), std.detach())
        shape = mean.shape
        noise = None
        if torch.rand(()) < PERTURB_P:
            a, b = torch.randn(shape, device=x.device) * LOCAL_STD, torch.randn(shape, device=x.device) * LOCAL_STD
            x, noise, target = perturb(x, a, b, mean.detach()), (a, b), (mean.detach(), std.detach())
        if torch.rand(()) < PERTURB_P:
            a, b = torch.randn(shape, device=x.device) * GLOBAL_STD, torch.randn(shape, device=x.device) * GLOBAL_STD
            center = self.style_mean.expand_as(mean)
            if noise is None:  # the reference's cyclic term then aligns with the EMA style
                noise, target = (a, b), (center, self.style_std.expand_as(std))
            x = perturb(x, a, b, center)
        if noise is None:  # unchanged, as in the reference; a zero term still reaches every parameter, because
            # multi-process DDP refuses a step in which a trained parameter got no gradient
            self.links.append(sum(p.sum() for p in self.parameters()) * 0.0)
            return x
        rectified, rect_mean, rect_std = self.rectify(x)
        a, b = noise  # perturb the rectified statistics again with the same noise, and rectify a second time
        again = perturb(rectified.detach(), a, b, rect_mean.detach())
        _, cyc_mean, cyc_std = self.rectify(again)
        goal_mean, goal_std = target
        self.cyclic_terms.append(F.l1_loss(rect_mean, goal_mean) + F.l1_loss(rect_std, goal_std)
                                 + F.l1_loss(cyc_mean, goal_mean) + F.l1_loss(cyc_std, goal_std))
        return rectified


def pop_cyclic_loss(adapters: nn.ModuleDict, device: torch.device) -> Tensor:
    """The mean cyclic term recorded since the last call (0 when nothing was perturbed); empties the records."""
    terms = [t for adapter in adapters.values() for t in adapter.cyclic_terms]
    links = [t for adapter in adapters.values() for t in adapter.links]
    for adapter in adapters.values():
        adapter.cyclic_terms, adapter.links = [], []
    loss = torch.stack(terms).mean() if terms else torch.zeros((), device=device)
    return loss + sum(links) if links else loss


def stage_channels(stage: nn.Module) -> int:
    """Output channels of a backbone stage (its last BatchNorm's width)."""
    norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError("a stage without BatchNorm: cannot tell its output channels")
    return norms[-1].num_features
