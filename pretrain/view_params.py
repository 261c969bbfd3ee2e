"""The random parameters of one MoCo-v2 view, drawn in a loader worker for ``data.augment_on=device``.

The draws follow the distributions of the worker path (lightly's ``MoCoV2Transform`` and
:class:`superpixels.transforms.JointViewTransform`, i.e. torchvision's ``RandomResizedCrop.get_params`` and
``ColorJitter.get_params`` plus lightly's blur and flip probabilities); ``tests/test_device_views.py`` compares the
two by drawing many. Each sample's parameters come from a generator seeded by (seed, epoch, index) alone, so
they do not depend on the batch, the worker or the device that applies them (:mod:`pretrain.device_views`).
"""

from __future__ import annotations

import math

import numpy as np

from common.batch_augment import JITTER_NEUTRAL
from superpixels.transforms import PhotometricConfig

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range, which MoCo-v2 keeps


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's draws: a pure function of (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def crop_params(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` in pixels: torchvision's ``RandomResizedCrop.get_params`` algorithm.

    Ten tries of area U[scale] x image and log-uniform aspect ratio; the first that fits is placed uniformly;
    else the largest centred crop whose ratio is within ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def photometric_params(rng: np.random.Generator, pm: PhotometricConfig) -> dict[str, np.ndarray]:
    """Colour parameters of one view.

    Returns:
        ``jitter [4]`` float32 (brightness, contrast, saturation multipliers, hue shift in turns; neutral when the
        jitter is not applied, probability ``pm.jitter_prob``), ``order [4]`` int64 (a permutation),
        ``gray`` bool, ``sigma`` float32 (blur sigma in pixels, 0 = no blur).
    """
    jitter = np.array(JITTER_NEUTRAL, np.float32)
    order = rng.permutation(4).astype(np.int64)
    if rng.random() < pm.jitter_prob:
        for i, strength in enumerate((pm.brightness, pm.contrast, pm.saturation)):
            jitter[i] = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        jitter[3] = rng.uniform(-pm.hue, pm.hue)
    gray = rng.random() < pm.grayscale_prob
    sigma = rng.uniform(*pm.blur_sigma) if rng.random() < pm.blur_prob else 0.0
    return {"jitter": jitter, "order": order, "gray": np.array(gray), "sigma": np.array(sigma, np.float32)}


def view_params(rng: np.random.Generator, height: int, width: int, min_scale: float, hflip_prob: float,
                pm: PhotometricConfig, offset: tuple[int, int] = (0, 0)) -> dict[str, np.ndarray]:
    """Everything that makes one view of a ``height x width`` region whose top-left pixel is ``offset`` (y, x).

    Returns:
        :func:`photometric_params` plus ``box [4]`` float64 ``(x1, y1, x2, y2)`` in the image's pixels and
        ``flip`` bool.
    """
    top, left, h, w = crop_params(rng, height, width, (min_scale, 1.0))
    top, left = top + offset[0], left + offset[1]
    box = np.array([left, top, left + w, top + h], np.float64)
    return {"box": box, "flip": np.array(rng.random() < hflip_prob), **photometric_params(rng, pm)}
