"""Stage-1 views made on the accelerator (``data.augment_on=device``): a batch of canvases -> the model's inputs.

In this mode a loader worker sends, per image, the decoded image on a fixed canvas (or its JPEG bytes, with
``data.decode_on=device``), the superpixel label map on the same canvas (pooled mode) and the random
parameters of every view (:mod:`pretrain.view_params`). :class:`DeviceViews` turns that into exactly the keys
the worker path produces (``view_q/k``, ``labels_q/k``, ``patch_q/k``), batched with
:mod:`common.batch_augment`, with no value read back to the host.

A canvas holds the image scaled to fit ``canvas_side`` (never enlarged) at its top-left corner; boxes arrive
in canvas pixels already, so nothing here depends on the original size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import normalize  # batched: [N,3,S,S]

from common.batch_augment import color_jitter, crop_resize, crop_resize_labels, gaussian_blur, grayscale, hflip
from pretrain.config import PretrainConfig

MEAN, STD = list(IMAGENET_NORMALIZE["mean"]), list(IMAGENET_NORMALIZE["std"])
HOST_KEYS = ("jpeg", "region_count")  # batch entries that stay on the host (bytes to decode, a shape)


def canvas_size(height: int, width: int, side: int) -> tuple[int, int]:
    """The image's size on a ``side x side`` canvas: scaled down to fit, never up."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_to_canvas(jpegs: list[Tensor], side: int, device: torch.device) -> Tensor:
    """JPEG bytes (``[L]`` uint8 CPU tensors) -> ``[B,3,side,side]`` uint8 canvases on ``device``.

    torchvision decodes the whole list on the GPU (nvJPEG) when ``device`` is CUDA, on the CPU otherwise;
    images larger than the canvas are shrunk (bilinear, antialiased) to :func:`canvas_size`.
    """
    images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    canvas = torch.zeros(len(images), 3, side, side, dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        h, w = canvas_size(image.shape[1], image.shape[2], side)
        if (h, w) != tuple(image.shape[1:]):
            image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        canvas[i, :, :h, :w] = image
    return canvas


class DeviceViews:
    """Applies the per-sample view parameters of a batch on its device (see the module docstring).

    Args:
        cfg: the run's config (view sizes, local mode, blur range, canvas side).
        device: where the batch is.
    """

    def __init__(self, cfg: PretrainConfig, device: torch.device) -> None:
        self.device = device
        self.side = cfg.data.canvas_side
        self.global_size, self.local_size = cfg.aug.global_size, cfg.aug.local_size
        self.max_sigma = max(cfg.aug.photometric.blur_sigma)
        self.mode = cfg.loss.local_mode if cfg.uses_local else "none"
        self.want_global = cfg.uses_global or self.mode == "pooled"

    def __call__(self, batch: dict[str, Tensor | list[Tensor]]) -> dict[str, Tensor]:
        """Canvases + parameters (see :class:`pretrain.data.PretrainImages`) -> the model's batch."""
        if "jpeg" in batch:
            canvas = decode_to_canvas(batch["jpeg"], self.side, self.device)
        else:
            canvas = batch["canvas"]
        images = canvas.float().div_(255)  # [B,3,C,C]
        index = torch.arange(images.shape[0], device=images.device)
        out: dict[str, Tensor] = {}
        views = [(f"view_{v}", f"{v}_", self.global_size) for v in "qk"] if self.want_global else []
        if self.mode == "patch":
            views += [(f"patch_{v}", f"patch_{v}_", self.local_size) for v in "qk"]
        for name, prefix, size in views:
            out[name] = self.view(images, index, batch, prefix, size)
            if self.mode == "pooled" and name.startswith("view_"):
                labels = crop_resize_labels(batch["canvas_labels"], batch[prefix + "box"], index, size)
                out["labels_" + name[-1]] = hflip(labels, batch[prefix + "flip"])
        if "region_count" in batch:
            out["region_count"] = batch["region_count"]
        return out

    def view(self, images: Tensor, index: Tensor, batch: dict, prefix: str, size: int) -> Tensor:
        """One view per image: crop-resize, flip, jitter, grayscale, blur, normalise (MoCo-v2's order; the flip
        commutes with the colour steps)."""
        x = crop_resize(images, batch[prefix + "box"], index, size)
        x = hflip(x, batch[prefix + "flip"])
        x = color_jitter(x, batch[prefix + "jitter"], batch[prefix + "order"])
        x = grayscale(x, batch[prefix + "gray"])
        x = gaussian_blur(x, batch[prefix + "sigma"], self.max_sigma)
        return normalize(x, MEAN, STD)
