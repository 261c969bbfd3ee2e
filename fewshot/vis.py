"""PNG grids of evaluation episodes: support+mask | query | ground truth | prediction | the method's maps.

PNG, not JPEG: JPEG smears mask edges. Images are un-normalised with the data pipeline's mean/std; masks are
drawn with torchvision's ``draw_segmentation_masks``; region maps (values in [0, 1]) are shown as heat maps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import draw_segmentation_masks, make_grid

from common.io import atomic_path

# the stage-2 transforms normalise 0-255 images with ImageNet statistics (PFENet's convention)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
FG, GT, PRED = "#ffd400", "#00d060", "#ff3355"


def to_uint8(image: Tensor) -> Tensor:
    """``[3,H,W]`` normalised float -> uint8 RGB."""
    return (image.detach().float().cpu() * STD + MEAN).clamp(0, 255).round().to(torch.uint8)


def overlay(image: Tensor, mask: Tensor, colour: str, alpha: float = 0.5) -> Tensor:
    """``image [3,H,W] uint8`` with ``mask [H,W]`` (1 = foreground; 255 ignored) drawn in ``colour``."""
    return draw_segmentation_masks(image, (mask == 1).cpu(), alpha=alpha, colors=colour)


def heatmap(region_map: Tensor, size: tuple[int, int]) -> Tensor:
    """``[1,h,w]`` or ``[h,w]`` map in [0, 1] -> ``[3,H,W]`` uint8 (dark blue = 0, yellow = 1)."""
    m = region_map.detach().float().cpu().reshape(1, 1, *region_map.shape[-2:])
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)[0, 0].clamp(0, 1)
    rgb = torch.stack([m, m ** 0.5 * 0.9, (1 - m) * 0.6 + 0.1])
    return (rgb * 255).round().to(torch.uint8)


def episode_row(supports: Tensor, support_masks: Tensor, query: Tensor, target: Tensor, pred: Tensor,
                maps: list[Tensor]) -> list[Tensor]:
    """Panels of one episode, all ``[3,S,S]`` uint8.

    Args:
        supports ``[K,3,S,S]``, support_masks ``[K,S,S]``, query ``[3,S,S]``, target / pred ``[S,S]``,
        maps: the segmenter's named maps for this episode, each ``[1,h,w]`` in [0, 1], as heat maps.
    """
    size = tuple(query.shape[-2:])
    panels = [overlay(to_uint8(s), m, FG) for s, m in zip(supports, support_masks)]
    q = to_uint8(query)
    panels += [q, overlay(q, target, GT), overlay(q, pred, PRED)]
    panels += [heatmap(region_map, size) for region_map in maps]
    return panels


def save_grid(rows: list[list[Tensor]], titles: list[str], path: str | Path) -> Path:
    """One row per episode (equal panel counts), a title line above each row, written as PNG."""
    ncol = len(rows[0])
    grid = make_grid([p for row in rows for p in row], nrow=ncol, padding=4, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    panel_h = rows[0][0].shape[-2] + 4
    canvas = Image.new("RGB", (image.width, image.height + 14 * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        top = i * (panel_h + 14)
        draw.text((4, top + 1), title, fill=(0, 0, 0))
        canvas.paste(image.crop((0, i * panel_h, image.width, (i + 1) * panel_h + 4)), (0, top + 14))
    with atomic_path(path) as tmp:
        canvas.save(tmp)
    return Path(path)


def column_titles(shot: int, map_names: list[str]) -> str:
    """The grid's column captions, left to right."""
    return " | ".join([f"support {i + 1}" for i in range(shot)] + ["query", "ground truth", "prediction"]
                      + [f"{name} map" for name in map_names])
