"""PNG figures of superpixels: boundary overlays, and colour-coded ids across two augmented views.

Panels are laid out on a white canvas with ``PAD`` pixels between and around cells; every cell is as large
as the largest panel, so a grid of ``n`` panels in ``ncol`` columns is
``rows * (cell_h + PAD) + PAD`` by ``ncol * (cell_w + PAD) + PAD`` pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from skimage.segmentation import mark_boundaries

from common.io import atomic_path

PAD = 2
ImageLike = np.ndarray | Image.Image | torch.Tensor


def region_colours(num_ids: int) -> np.ndarray:
    """[num_ids,3] uint8 colours, fixed per id so a region has the same colour in every panel and figure."""
    return np.random.default_rng(0).integers(40, 256, size=(num_ids, 3), dtype=np.uint8)


def to_rgb_uint8(image: ImageLike, normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE) -> np.ndarray:
    """[H,W,3] uint8 from a PIL image, a uint8 array, or a float view tensor [3,H,W] (un-normalised first)."""
    if isinstance(image, torch.Tensor):
        view = image.detach().float().cpu()
        if normalize is not None:
            view = view * torch.tensor(normalize["std"])[:, None, None] + torch.tensor(normalize["mean"])[:, None, None]
        return (view.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a [H,W,3] uint8 array, got {image.dtype} {image.shape}")
    return image


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def _tile(panels: Sequence[np.ndarray], ncol: int) -> np.ndarray:
    """Paste [h,w,3] uint8 panels row-major into a padded grid of equal cells."""
    ncol = max(1, min(ncol, len(panels)))
    rows = math.ceil(len(panels) / ncol)
    cell_h = max(p.shape[0] for p in panels)
    cell_w = max(p.shape[1] for p in panels)
    canvas = np.full((rows * (cell_h + PAD) + PAD, ncol * (cell_w + PAD) + PAD, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        top = PAD + (i // ncol) * (cell_h + PAD)
        left = PAD + (i % ncol) * (cell_w + PAD)
        canvas[top:top + panel.shape[0], left:left + panel.shape[1]] = panel
    return canvas


def _write_png(canvas: np.ndarray, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return Path(path)


def _boundaries(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (mark_boundaries(rgb, labels, color=(1, 1, 0)) * 255).round().astype(np.uint8)


def save_boundary_grid(images: Sequence[ImageLike], labels: Sequence[np.ndarray | torch.Tensor],
                       path: str | os.PathLike[str], ncol: int = 4) -> Path:
    """Write a PNG grid of images with their superpixel boundaries drawn in yellow.

    Args:
        images: n images ([H,W,3] uint8, PIL, or ImageNet-normalised [3,H,W] tensors).
        labels: n label maps [H,W] matching the images.
        path: output PNG.
        ncol: columns of the grid.
    """
    if len(images) != len(labels) or not images:
        raise ValueError(f"need as many label maps as images (and at least one), got {len(images)} and {len(labels)}")
    panels = []
    for image, lab in zip(images, labels, strict=True):
        rgb, lab = to_rgb_uint8(image), _as_labels(lab)
        if lab.shape != rgb.shape[:2]:
            raise ValueError(f"label map {lab.shape} does not match image {rgb.shape[:2]}")
        panels.append(_boundaries(rgb, lab))
    return _write_png(_tile(panels, ncol), path)


def save_view_pair_grid(image: ImageLike, labels: np.ndarray | torch.Tensor,
                        view1: ImageLike, labels1: np.ndarray | torch.Tensor,
                        view2: ImageLike, labels2: np.ndarray | torch.Tensor,
                        path: str | os.PathLike[str],
                        normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE) -> Path:
    """Write a 2x3 PNG: original, view 1, view 2 (top, with boundaries) over their ids colour-coded (bottom).

    The same id has the same colour in all three panels, so a region that survives augmentation keeps its
    colour: the visual check that ids stay attached to their pixels. The original is resized (labels
    nearest) so that its long side equals the larger view side.

    Args:
        image, labels: the original PIL/[H,W,3] uint8 image and its [H,W] label map.
        view1, labels1, view2, labels2: [3,S,S] view tensors (or uint8/PIL images) and their [S,S] labels.
        path: output PNG.
        normalize: the normalisation to undo on view tensors (None: they are in [0, 1]).
    """
    pairs = [(to_rgb_uint8(image), _as_labels(labels)),
             (to_rgb_uint8(view1, normalize), _as_labels(labels1)),
             (to_rgb_uint8(view2, normalize), _as_labels(labels2))]
    for rgb, lab in pairs:
        if lab.shape != rgb.shape[:2]:
            raise ValueError(f"label map {lab.shape} does not match image {rgb.shape[:2]}")
    side = max(max(rgb.shape[:2]) for rgb, _ in pairs[1:])
    rgb, lab = pairs[0]
    scale = side / max(rgb.shape[:2])
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    pairs[0] = (np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)),
                np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.Resampling.NEAREST)))
    colours = region_colours(int(max(lab.max() for _, lab in pairs)) + 1)
    coded = [(0.35 * rgb + 0.65 * colours[lab]).round().astype(np.uint8) for rgb, lab in pairs]
    top = [_boundaries(rgb, lab) for rgb, lab in pairs]
    bottom = [_boundaries(c, lab) for c, (_, lab) in zip(coded, pairs, strict=True)]
    return _write_png(_tile(top + bottom, ncol=3), path)
