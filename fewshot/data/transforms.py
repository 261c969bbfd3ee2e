"""Image + mask transforms of stage 2, on torch tensors through torchvision; no OpenCV.

Inputs are what a benchmark's ``load`` returns (uint8 RGB ``[H, W, 3]``, uint8 mask ``[H, W]`` in {0, 1, 255});
outputs are a float image ``[3, S, S]`` normalised with the ImageNet statistics on the 0-255 scale (as PFENet)
and an int64 mask ``[S, S]``. Randomness comes only from the ``numpy.random.Generator`` passed in, so the
caller decides what an augmentation depends on (the loader seeds it from seed, epoch and episode index).
S must be 8n+1, the sizes the few-shot model's feature maps are built for.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from fewshot.data.base import IGNORE_INDEX
from fewshot.data.config import DataConfig

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
BLUR_SIGMA = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a 5x5 kernel given sigma 0 (PFENet)


def check_size(size: int) -> int:
    """Return ``size`` if it is 8n+1, else raise ValueError."""
    if size < 9 or (size - 1) % 8:
        raise ValueError(f"input size {size} must be 8n+1 (e.g. 473, 401, 97) for the few-shot model")
    return size


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """uint8 ``[H, W, 3]`` / ``[H, W]`` -> float ``[3, H, W]`` (0-255) / uint8 ``[1, H, W]``."""
    return torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1), torch.from_numpy(np.array(mask))[None]


def normalise(image: Tensor) -> Tensor:
    """ImageNet mean / std on a 0-255 float image ``[3, H, W]``."""
    return F.normalize(image, list(MEAN), list(STD))


class TrainTransform:
    """PFENet training augmentation, applied independently to the query and to each support.

    Optionally a resize to ``long_side`` first (folded into the same resize); RandScale U[scale] (image
    bilinear, mask nearest); with p .5 RandRotate U[rotate] degrees (image padded
    with the mean, mask with 255); with p .5 a 5x5 Gaussian blur; with p .5 a horizontal flip; then a random
    ``size`` crop (centre-padded first when smaller; re-drawn up to 30 times while it keeps under 85% of the
    foreground); ToTensor and normalisation.
    """

    def __init__(self, size: int = 473, scale: tuple[float, float] = (0.9, 1.1),
                 rotate: tuple[float, float] = (-10.0, 10.0), fg_keep: float = 0.85, redraws: int = 30,
                 long_side: int = 0) -> None:
        self.size, self.scale, self.rotate, self.long_side = check_size(size), scale, rotate, long_side
        self.fg_keep, self.redraws = fg_keep, redraws

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """uint8 ``[H, W, 3]``, ``[H, W]`` -> float ``[3, S, S]``, int64 ``[S, S]``."""
        img, lab = to_tensors(image, mask)
        s = rng.uniform(*self.scale)
        if self.long_side:
            s *= self.long_side / max(lab.shape[1:])
        h, w = max(1, round(lab.shape[1] * s)), max(1, round(lab.shape[2] * s))
        img = F.resize(img, [h, w], InterpolationMode.BILINEAR, antialias=False)
        lab = F.resize(lab, [h, w], InterpolationMode.NEAREST)
        if rng.random() < 0.5:
            angle = float(rng.uniform(*self.rotate))
            img = F.rotate(img, angle, InterpolationMode.BILINEAR, fill=list(MEAN))
            lab = F.rotate(lab, angle, InterpolationMode.NEAREST, fill=[float(IGNORE_INDEX)])
        if rng.random() < 0.5:
            img = F.gaussian_blur(img, [5, 5], [BLUR_SIGMA, BLUR_SIGMA])
        if rng.random() < 0.5:
            img, lab = F.horizontal_flip(img), F.horizontal_flip(lab)
        img, lab = self.crop(img, lab, rng)
        return normalise(img), lab[0].long()

    def crop(self, img: Tensor, lab: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Pad (centred) to at least S, then a random S x S crop that tries to keep the foreground."""
        S = self.size
        pad_h, pad_w = max(S - lab.shape[1], 0), max(S - lab.shape[2], 0)
        if pad_h or pad_w:
            padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]  # left, top, right, bottom
            img = F.pad(img, padding, fill=list(MEAN))
            lab = F.pad(lab, padding, fill=IGNORE_INDEX)
        h, w = lab.shape[1:]
        fg_total = int((lab == 1).sum())

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, h - S + 1)), int(rng.integers(0, w - S + 1))

        top, left = draw()
        for _ in range(self.redraws):
            if int((lab[:, top:top + S, left:left + S] == 1).sum()) >= self.fg_keep * fg_total:
                break
            top, left = draw()
        return img[:, top:top + S, left:left + S], lab[:, top:top + S, left:left + S]


class EvalTransform:
    """Deterministic evaluation resize.

    ``pfenet``: resize keeping the aspect ratio so the long side is S, floor both sides to a multiple of 8,
    paste top-left into an S x S canvas of zeros (so padding normalises to about -2; the mask is padded with
    255). ``hsnet``: squash to S x S.
    """

    def __init__(self, size: int = 473, protocol: Literal["pfenet", "hsnet"] = "pfenet") -> None:
        if protocol not in ("pfenet", "hsnet"):
            raise ValueError(f"evaluation protocol must be pfenet or hsnet, got {protocol!r}")
        self.size, self.protocol = check_size(size), protocol

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the image is resized to before padding."""
        S = self.size
        if self.protocol == "hsnet":
            return S, S
        h, w = (S, int(width * S / height)) if height >= width else (int(height * S / width), S)
        return max(8, h // 8 * 8), max(8, w // 8 * 8)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        """uint8 ``[H, W, 3]``, ``[H, W]`` -> float ``[3, S, S]``, int64 ``[S, S]`` (``rng`` is unused)."""
        img, lab = to_tensors(image, mask)
        h, w = self.content_size(*lab.shape[1:])
        # PFENet resizes with OpenCV (no antialiasing), HSNet with PIL (antialiased)
        img = F.resize(img, [h, w], InterpolationMode.BILINEAR, antialias=self.protocol == "hsnet")
        lab = F.resize(lab, [h, w], InterpolationMode.NEAREST)
        if (h, w) != (self.size, self.size):
            img = F.pad(img, [0, 0, self.size - w, self.size - h], fill=0.0)
            lab = F.pad(lab, [0, 0, self.size - w, self.size - h], fill=IGNORE_INDEX)
        return normalise(img), lab[0].long()


def build_transform(cfg: DataConfig, train: bool, protocol: Literal["pfenet", "hsnet"] = "pfenet"
                    ) -> TrainTransform | EvalTransform:
    """The training augmentation, or the evaluation resize of ``protocol``, with the sizes of ``cfg``."""
    if train:
        return TrainTransform(cfg.train_size, tuple(cfg.scale), tuple(cfg.rotate), long_side=cfg.train_long_side)
    return EvalTransform(cfg.eval_size, protocol)
