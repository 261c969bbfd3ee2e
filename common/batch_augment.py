"""Image augmentation of a whole batch on its device, with every sample's own parameters.

The parameters are drawn elsewhere (per sample, from a seeded generator, in the loader workers) and arrive
as tensors; these functions only apply them, so a batch's views do not depend on how it was batched and no
step reads a value back to the host. The pixel work is done by torchvision (``roi_align`` for crops) and
kornia (colour, grayscale, blur), whose colour formulas are torchvision's; what is written here is the
branch-free plumbing around them: ``torch.where`` on per-sample flags instead of Python ``if``s.

Conventions: images are float ``[N,3,H,W]`` in [0, 1]; boxes are ``[N,4]`` ``(x1, y1, x2, y2)`` in continuous
pixel coordinates (pixel ``i`` covers ``[i, i+1)``), as torchvision's ``resized_crop(top, left, h, w)`` is
``(left, top, left + w, top + h)``.
"""

from __future__ import annotations

import math

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import Tensor
from torchvision.ops import roi_align

# colour-jitter steps in torchvision's numbering (ColorJitter.get_params' fn_idx) and their neutral factors
JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")
JITTER_NEUTRAL = (1.0, 1.0, 1.0, 0.0)


def crop_resize(images: Tensor, boxes: Tensor, index: Tensor, size: int) -> Tensor:
    """Bilinear crop-and-resize of ``boxes`` out of ``images``, antialiased when shrinking.

    torchvision's ``roi_align`` with ``aligned=True`` samples at pixel centres like ``resize(bilinear)``, and its
    adaptive sampling grid (``ceil(box / size)`` points per output pixel, averaged) low-pass filters a crop that
    is shrunk, as the PIL path's antialiasing does.

    Args:
        images: ``[B,C,H,W]`` float.
        boxes: ``[N,4]`` float ``(x1, y1, x2, y2)`` per crop.
        index: ``[N]`` int64, which image each box is cut from.
        size: output side S.

    Returns:
        ``[N,C,S,S]``.
    """
    rois = torch.cat([index.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(images, rois.to(images.dtype), (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def crop_resize_labels(labels: Tensor, boxes: Tensor, index: Tensor, size: int) -> Tensor:
    """Pixel-centre nearest crop-and-resize of label maps: ids stay ids, on the pixels the image views show.

    Output pixel ``i`` reads the label under its centre, ``floor(x1 + (i + 0.5) * (x2 - x1) / S)``: torchvision's
    ``NEAREST_EXACT``, the sampling :class:`superpixels.transforms.JointViewTransform` uses.

    Args:
        labels: ``[B,H,W]`` integer ids.
        boxes: ``[N,4]`` float ``(x1, y1, x2, y2)``.
        index: ``[N]`` int64 image of each box.
        size: output side S.

    Returns:
        ``[N,S,S]`` int64.
    """
    height, width = labels.shape[-2:]
    steps = (torch.arange(size, device=boxes.device, dtype=torch.float64) + 0.5) / size  # [S]
    boxes = boxes.to(torch.float64)
    rows = (boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])).floor().long().clamp(0, height - 1)  # [N,S]
    cols = (boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])).floor().long().clamp(0, width - 1)
    return labels[index[:, None, None], rows[:, :, None], cols[:, None, :]].long()


def hflip(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror the samples whose ``flip [N]`` flag is set (``images [N,...,W]``)."""
    return torch.where(flip.view(-1, *[1] * (images.ndim - 1)), images.flip(-1), images)


def color_jitter(images: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """torchvision's ColorJitter with per-sample factors and per-sample step order.

    Every step runs at every position with the neutral factor where a sample does not take it there, so the
    result has no data-dependent branch: 16 kornia calls instead of 4, each elementwise.

    Args:
        images: ``[N,3,H,W]`` in [0, 1].
        factors: ``[N,4]`` brightness, contrast, saturation (multipliers) and hue (a shift in turns, [-0.5, 0.5]);
            a sample that is not jittered carries ``JITTER_NEUTRAL``.
        order: ``[N,4]`` int64, each row a permutation of 0..3 (``ColorJitter.get_params``' ``fn_idx``).

    Returns:
        ``[N,3,H,W]`` in [0, 1].
    """
    neutral = torch.tensor(JITTER_NEUTRAL, device=factors.device, dtype=factors.dtype)
    for position in range(4):
        for step in range(4):
            takes = order[:, position] == step  # [N]
            factor = torch.where(takes, factors[:, step], neutral[step])
            images = _jitter_step(images, step, factor)
    return images


def _jitter_step(images: Tensor, step: int, factor: Tensor) -> Tensor:
    if step == 0:
        return adjust_brightness_accumulative(images, factor).clamp(0, 1)
    if step == 1:
        return adjust_contrast_with_mean_subtraction(images, factor).clamp(0, 1)
    if step == 2:
        return adjust_saturation_with_gray_subtraction(images, factor).clamp(0, 1)
    # kornia shifts hue in radians, torchvision in turns; a zero shift would still round-trip through HSV
    return torch.where((factor != 0).view(-1, 1, 1, 1), adjust_hue(images, factor * 2 * math.pi), images)


def grayscale(images: Tensor, gray: Tensor) -> Tensor:
    """ITU-R 601 luma on three channels for the samples whose ``gray [N]`` flag is set."""
    luma = rgb_to_grayscale(images).expand_as(images)
    return torch.where(gray.view(-1, 1, 1, 1), luma, images)


def gaussian_blur(images: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Gaussian blur with a per-sample ``sigma [N]`` in pixels; ``sigma == 0`` leaves a sample unblurred.

    The kernel covers +-3 ``max_sigma`` (13 taps for MoCo-v2's sigma <= 2 at 224 px), reflect-padded.
    """
    radius = max(1, math.ceil(3 * max_sigma))
    # kornia's own gaussian_blur2d checks sigma > 0 with a host read; its kernel and filter parts do not
    kernel = get_gaussian_kernel1d(2 * radius + 1, sigma.clamp(min=1e-3).to(images.dtype)[:, None])  # [N,K]
    blurred = filter2d_separable(images, kernel, kernel, border_type="reflect")
    return torch.where((sigma > 0).view(-1, 1, 1, 1), blurred, images)
