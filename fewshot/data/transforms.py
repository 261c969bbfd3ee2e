"""Image + mask transforms of stage 2, on torch tensors through torchvision; no OpenCV.

Inputs are what a benchmark's ``load`` returns (uint8 RGB ``[H, W, 3]``, uint8 mask ``[H, W]`` in {0, 1, 255});
outputs are a float image ``[3, S, S]`` normalised with the ImageNet statistics on the 0-255 scale (as PFENet)
and an int64 mask ``[S, S]``. Randomness comes only from the ``numpy.random.Generator`` passed in, so the
caller decides what an augmentation depends on (the loader seeds it from seed, epoch and episode index).
S must be 8n+1, the sizes the few-shot model's feature maps are built for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainDraws:
    """The random choices :class:`TrainTransform` made for one image, in the order it drew them.

    ``source`` is the image's ``(h, w)`` before anything, ``resized`` after the (long-side and random) resize,
    ``angle`` the rotation in degrees (None = not rotated), ``pad`` the ``(left, top)`` centring pad and ``crop``
    the ``(top, left)`` of the S x S crop in the padded image.
    """

    source: tuple[int, int]
    resized: tuple[int, int]
    angle: float | None
    blur: bool
    flip: bool
    pad: tuple[int, int]
    crop: tuple[int, int]

    def matrix(self) -> np.ndarray:
        """``[2, 3]`` float64 affine map from the crop's pixel coordinates to the source image's.

        Continuous coordinates, pixel ``i`` covering ``[i, i + 1)`` (x right, y down), so the composition is
        exact for the resize (``align_corners=False``), the rotation about the centre ``(w / 2, h / 2)`` that
        torchvision's ``rotate`` uses, the flip ``x -> w - x`` and the integer pad and crop offsets.
        """
        (h0, w0), (h, w) = self.source, self.resized
        crop = _translate(self.crop[1] - self.pad[0], self.crop[0] - self.pad[1])  # crop -> rotated/flipped image
        flip = np.array([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]]) if self.flip else np.eye(3)
        theta = math.radians(self.angle or 0.0)  # torchvision's inverse rotation: output -> input about the centre
        rotation = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0],
                             [0, 0, 1]])
        rotate = _translate(w / 2, h / 2) @ rotation @ _translate(-w / 2, -h / 2)
        resize = np.diag([w0 / w, h0 / h, 1.0])
        return (resize @ rotate @ flip @ crop)[:2]

    def frame(self) -> tuple[float, float, float, float]:
        """The resized (rotated, flipped) image's extent ``(x1, y1, x2, y2)`` in the crop's pixel coordinates.

        Outside it lies the pad, which is fill even where the inverse rotation would reach into the source
        (``rotate`` keeps the frame and cuts the corners it turns out of it).
        """
        x1, y1 = self.pad[0] - self.crop[1], self.pad[1] - self.crop[0]
        return float(x1), float(y1), float(x1 + self.resized[1]), float(y1 + self.resized[0])


def _translate(x: float, y: float) -> np.ndarray:
    return np.array([[1.0, 0, x], [0, 1, y], [0, 0, 1]])


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
        draws, lab = self.draw(lab, rng)
        return normalise(self.apply(img, draws)), lab

    def draw(self, lab: Tensor, rng: np.random.Generator) -> tuple[TrainDraws, Tensor]:
        """Draw every random choice for one image and apply them to its mask (uint8 ``[1, H, W]``).

        The crop's redraws look at the mask only, so the image never changes what is drawn. Returns the draws
        and the int64 ``[S, S]`` mask.
        """
        source = tuple(lab.shape[1:])
        s = rng.uniform(*self.scale)
        if self.long_side:
            s *= self.long_side / max(source)
        h, w = max(1, round(source[0] * s)), max(1, round(source[1] * s))
        lab = F.resize(lab, [h, w], InterpolationMode.NEAREST)
        angle = None
        if rng.random() < 0.5:
            angle = float(rng.uniform(*self.rotate))
            lab = F.rotate(lab, angle, InterpolationMode.NEAREST, fill=[float(IGNORE_INDEX)])
        blur = bool(rng.random() < 0.5)
        flip = bool(rng.random() < 0.5)
        if flip:
            lab = F.horizontal_flip(lab)
        pad, lab = self.pad(lab, IGNORE_INDEX)
        crop = self.crop(lab, rng)
        lab = lab[:, crop[0]:crop[0] + self.size, crop[1]:crop[1] + self.size]
        return TrainDraws(source, (h, w), angle, blur, flip, pad, crop), lab[0].long()

    def apply(self, img: Tensor, draws: TrainDraws) -> Tensor:
        """The image side of ``draws``: float ``[3, H, W]`` (0-255) -> ``[3, S, S]`` (not normalised)."""
        img = F.resize(img, list(draws.resized), InterpolationMode.BILINEAR, antialias=False)
        if draws.angle is not None:
            img = F.rotate(img, draws.angle, InterpolationMode.BILINEAR, fill=list(MEAN))
        if draws.blur:
            img = F.gaussian_blur(img, [5, 5], [BLUR_SIGMA, BLUR_SIGMA])
        if draws.flip:
            img = F.horizontal_flip(img)
        _, img = self.pad(img, list(MEAN))
        top, left = draws.crop
        return img[:, top:top + self.size, left:left + self.size]

    def pad(self, x: Tensor, fill: float | list[float]) -> tuple[tuple[int, int], Tensor]:
        """Centre-pad ``x [C, H, W]`` with ``fill`` to at least S x S; returns the ``(left, top)`` pad and it."""
        S = self.size
        pad_h, pad_w = max(S - x.shape[1], 0), max(S - x.shape[2], 0)
        if pad_h or pad_w:
            padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]  # left, top, right, bottom
            x = F.pad(x, padding, fill=fill)
        return (pad_w // 2, pad_h // 2), x

    def crop(self, lab: Tensor, rng: np.random.Generator) -> tuple[int, int]:
        """The ``(top, left)`` of a random S x S crop of the padded mask that tries to keep the foreground."""
        S = self.size
        h, w = lab.shape[1:]
        fg_total = int((lab == 1).sum())

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, h - S + 1)), int(rng.integers(0, w - S + 1))

        top, left = draw()
        for _ in range(self.redraws):
            if int((lab[:, top:top + S, left:left + S] == 1).sum()) >= self.fg_keep * fg_total:
                break
            top, left = draw()
        return top, left


class DeviceTrainTransform(TrainTransform):
    """:class:`TrainTransform`'s geometry only, for ``data.augment_on=device``.

    The mask is made exactly as in :class:`TrainTransform` (same draws, same ops); the image is returned as it was read,
    with the parameters that :class:`fewshot.data.device_augment.DeviceAugment` applies batched on the accelerator:
    ``{"source": uint8 [3, H, W], "matrix": float32 [2, 3] (crop pixel -> source pixel, see :meth:`TrainDraws.matrix`),
    "frame": float32 [4] (:meth:`TrainDraws.frame`), "blur": bool []}``. The long-side resize is part of the matrix's
    scale, so the image is resampled once, as in the worker path.
    """

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[dict[str, Tensor], Tensor]:
        """uint8 ``[H, W, 3]``, ``[H, W]`` -> the image's parameters (above), int64 ``[S, S]`` mask."""
        draws, lab = self.draw(torch.from_numpy(np.array(mask))[None], rng)
        # copied only when read-only (torch warns on those); the permuted view is copied once, by the collate
        source = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)
        return {"source": source, "matrix": torch.from_numpy(draws.matrix()).float(),
                "frame": torch.tensor(draws.frame()), "blur": torch.tensor(draws.blur)}, lab


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


def build_transform(cfg: DataConfig, train: bool, protocol: Literal["pfenet", "hsnet"] = "pfenet",
                    augment_on: Literal["worker", "device"] = "worker") -> TrainTransform | EvalTransform:
    """The training augmentation (its geometry only with ``augment_on="device"``, the engine having resolved
    ``data.augment_on``), or the evaluation resize of ``protocol``, with the sizes of ``cfg``."""
    if train:
        kind = DeviceTrainTransform if augment_on == "device" else TrainTransform
        return kind(cfg.train_size, tuple(cfg.scale), tuple(cfg.rotate), long_side=cfg.train_long_side)
    return EvalTransform(cfg.eval_size, protocol)
