"""Image augmentation of a whole batch on its device, with every sample's own parameters.

The parameters are drawn elsewhere (per sample, from a seeded generator, in the loader workers) and arrive
as tensors; these functions only apply them, so a batch's views do not depend on how it was batched and no
step reads a value back to the host. The pixel work is done by torchvision (``roi_align`` for crops), torch
(``affine_grid`` / ``grid_sample`` for stage 2's affine warps) and kornia (colour, grayscale, blur), whose colour
formulas are torchvision's; what is written here is the branch-free plumbing around them: ``torch.where`` on
per-sample flags instead of Python ``if``s.

Conventions: images are float ``[N,3,H,W]`` in [0, 1] (stage 2's warp and blur work on any scale); boxes are ``[N,4]``
``(x1, y1, x2, y2)`` in continuous pixel coordinates (pixel ``i`` covers ``[i, i+1)``), as torchvision's
``resized_crop(top, left, h, w)`` is ``(left, top, left + w, top + h)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
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


def gaussian_blur(images: Tensor, sigma: Tensor, max_sigma: float, kernel_size: int | None = None) -> Tensor:
    """Gaussian blur with a per-sample ``sigma [N]`` in pixels; ``sigma == 0`` leaves a sample unblurred.

    The kernel covers +-3 ``max_sigma`` (13 taps for MoCo-v2's sigma <= 2 at 224 px) unless ``kernel_size``
    (odd) fixes it (PFENet's 5x5), reflect-padded as torchvision's ``gaussian_blur``.
    """
    size = kernel_size or 2 * max(1, math.ceil(3 * max_sigma)) + 1
    # kornia's own gaussian_blur2d checks sigma > 0 with a host read; its kernel and filter parts do not
    kernel = get_gaussian_kernel1d(size, sigma.clamp(min=1e-3).to(images.dtype)[:, None])  # [N,K]
    blurred = filter2d_separable(images, kernel, kernel, border_type="reflect")
    return torch.where((sigma > 0).view(-1, 1, 1, 1), blurred, images)


def warp_affine(images: Tensor, sizes: Tensor, matrices: Tensor, size: int, fill: Sequence[float],
                frames: Tensor | None = None) -> Tensor:
    """Bilinear affine warp of each sample out of its own top-left region of a padded batch, filled outside it.

    torch's ``affine_grid`` + ``grid_sample`` (``align_corners=False``) do the sampling; a validity channel
    sampled alongside (1 inside a sample's ``sizes`` region, 0 in the batch padding and beyond) weighs in
    ``fill`` where the taps leave the source: each sample is sampled as if extended by ``fill``, never reading the
    batch padding, and its edges blend into the fill as in torchvision's ``rotate(..., fill=)``.

    Args:
        images: ``[N,C,Hp,Wp]`` (any dtype, e.g. uint8), sample ``n`` in ``[:, :h_n, :w_n]``.
        sizes: ``[N,2]`` int64 ``(h_n, w_n)``.
        matrices: ``[N,2,3]`` maps output pixel coordinates ``(x, y, 1)`` to source pixel coordinates, both
            continuous (pixel ``i`` covers ``[i, i + 1)``).
        size: output side S.
        fill: C values written where the output falls outside the source (the images' scale).
        frames: optional ``[N,4]`` ``(x1, y1, x2, y2)`` in output pixel coordinates: output pixels whose centre
            lies outside are ``fill`` whatever the matrix reaches (a pad added after a rotation).

    Returns:
        ``[N,C,S,S]`` float32.
    """
    n, c, hp, wp = images.shape
    dev = images.device
    matrices = matrices.to(device=dev, dtype=torch.float32)
    # theta maps the output's normalised coordinates ([-1, 1] over the outer edges) to the padded input's
    to_pixels = torch.tensor([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]], device=dev)
    to_unit = torch.tensor([[2 / wp, 0, -1], [0, 2 / hp, -1]], device=dev)
    theta = to_unit @ torch.cat([matrices, to_pixels[2:].expand(n, 1, 3)], dim=1) @ to_pixels  # [N,2,3]
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    rows = torch.arange(hp, device=dev) < sizes[:, :1].to(dev)  # [N,Hp]
    cols = torch.arange(wp, device=dev) < sizes[:, 1:].to(dev)  # [N,Wp]
    valid = (rows[:, None, :, None] & cols[:, None, None, :]).float()  # [N,1,Hp,Wp]
    sampled = F.grid_sample(torch.cat([images.float(), valid], dim=1), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    image, weight = sampled[:, :c], sampled[:, c:]
    fill_t = torch.tensor(list(fill), device=dev, dtype=image.dtype).view(1, c, 1, 1)
    out = image + (1 - weight) * fill_t
    if frames is None:
        return out
    frames = frames.to(device=dev, dtype=torch.float32)
    centres = torch.arange(size, device=dev, dtype=torch.float32) + 0.5  # [S]
    inside_x = (centres > frames[:, 0:1]) & (centres < frames[:, 2:3])  # [N,S]
    inside_y = (centres > frames[:, 1:2]) & (centres < frames[:, 3:4])
    return torch.where((inside_y[:, :, None] & inside_x[:, None, :])[:, None], out, fill_t)


def resolve_augment_on(setting: str, device: torch.device) -> str:
    """A stage's ``data.augment_on`` with ``auto`` decided: device on CUDA, worker elsewhere."""
    if setting != "auto":
        return setting
    return "device" if device.type == "cuda" else "worker"
