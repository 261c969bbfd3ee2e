"""Superpixel label maps with scikit-image (SLIC or Felzenszwalb-Huttenlocher), dense ids from 0.

Label maps are computed once per image at its decoded resolution (PIL's ``Image.open`` size, no EXIF
transpose) and cached by :mod:`superpixels.cache`; nothing here runs inside the training loop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb, slic

from common.config import field


class TooFewSegmentsError(ValueError):
    """An image yields fewer than two sampleable superpixels, so it offers no local contrast."""


@dataclass
class SuperpixelConfig:
    """How label maps are computed, cached and filtered for sampling."""

    method: Literal["slic", "felzenszwalb"] = field(
        "slic", help="superpixel algorithm; the paper found SLIC better than Felzenszwalb (FH)")
    n_segments: int = field(32, help="SLIC: approximate number of segments per image")
    compactness: float = field(10.0, help="SLIC: colour vs. space trade-off; higher gives squarer segments")
    slic_sigma: float = field(0.0, help="SLIC: Gaussian pre-smoothing sigma in original-resolution pixels")
    max_num_iter: int = field(10, help="SLIC: k-means iterations")
    fh_scale: float = field(1000.0, help="FH: merge threshold k; larger gives bigger segments (DetCon: 1000)")
    fh_sigma: float = field(0.8, help="FH: Gaussian pre-smoothing sigma in original-resolution pixels")
    fh_min_size: int = field(1000, help="FH: minimum segment size in original-resolution pixels (DetCon: 1000)")
    max_side: int = field(0, help="0 segments at the original resolution; N downscales the long side to N for"
                                  " speed and upsamples the labels (nearest) back to the original size")
    min_area_frac: float = field(0.01, help="segments covering less than this fraction of the image are never"
                                            " sampled (does not change the cached label maps)")
    cache_dir: str = field("", help="root folder of the label-map cache (one sub-folder per params_hash)")
    workers: int = field(2, help="processes used by `python -m superpixels.cache` to precompute the cache")

    def validate(self) -> None:
        """Raise ValueError on values scikit-image would reject or that make sampling impossible."""
        if self.method not in ("slic", "felzenszwalb"):
            raise ValueError(f"superpixels.method must be 'slic' or 'felzenszwalb', got {self.method!r}")
        if self.n_segments < 2:
            raise ValueError(f"superpixels.n_segments must be >= 2, got {self.n_segments}")
        if self.compactness <= 0 or self.max_num_iter < 1:
            raise ValueError("superpixels.compactness must be > 0 and superpixels.max_num_iter >= 1")
        if self.slic_sigma < 0 or self.fh_sigma < 0 or self.fh_scale <= 0 or self.fh_min_size < 0:
            raise ValueError("superpixels sigmas and fh_min_size must be >= 0, fh_scale > 0")
        if self.max_side < 0 or self.max_side == 1:
            raise ValueError(f"superpixels.max_side must be 0 (off) or >= 2, got {self.max_side}")
        if not 0.0 <= self.min_area_frac < 0.5:
            raise ValueError(f"superpixels.min_area_frac must be in [0, 0.5), got {self.min_area_frac}")
        if self.workers < 0:
            raise ValueError(f"superpixels.workers must be >= 0, got {self.workers}")

    def label_params(self) -> dict[str, object]:
        """The parameters that determine a label map (the chosen method's own, plus ``max_side``)."""
        if self.method == "slic":
            own = {"n_segments": self.n_segments, "compactness": self.compactness,
                   "slic_sigma": self.slic_sigma, "max_num_iter": self.max_num_iter}
        else:
            own = {"fh_scale": self.fh_scale, "fh_sigma": self.fh_sigma, "fh_min_size": self.fh_min_size}
        return {"method": self.method, **own, "max_side": self.max_side}

    def params_hash(self) -> str:
        """12 hex digits of sha1 over :meth:`label_params`; stable across runs, processes and machines."""
        text = json.dumps(self.label_params(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept [H,W], [H,W,1], [H,W,3] or [H,W,4] uint8 and return [H,W,3] uint8 (alpha dropped)."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape [H,W], [H,W,1], [H,W,3] or [H,W,4], got {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image of shape {image.shape} is too small to segment")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def compute_superpixels(image: np.ndarray, cfg: SuperpixelConfig) -> np.ndarray:
    """Segment one image into superpixels.

    Args:
        image: [H,W,3] (or grayscale [H,W] / [H,W,1], or RGBA) uint8.
        cfg: the segmentation parameters.

    Returns:
        [H,W] label map with dense ids ``0..n-1`` (every id present); uint16, or int32 when n > 65535.
    """
    rgb = as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    # Pixel-unit parameters are given at the original resolution; rescale them with the image.
    scale = 1.0
    if cfg.max_side and max(height, width) > cfg.max_side:
        scale = cfg.max_side / max(height, width)
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(small, Image.Resampling.BILINEAR))
    if cfg.method == "slic":
        labels = slic(rgb, n_segments=cfg.n_segments, compactness=cfg.compactness, sigma=cfg.slic_sigma * scale,
                      max_num_iter=cfg.max_num_iter, start_label=0, channel_axis=-1)
    else:
        labels = felzenszwalb(rgb, scale=cfg.fh_scale * scale ** 2, sigma=cfg.fh_sigma * scale,
                              min_size=max(1, round(cfg.fh_min_size * scale ** 2)), channel_axis=-1)
    if labels.shape != (height, width):
        labels = _upsample_nearest(labels, height, width)
    ids, dense = np.unique(labels, return_inverse=True)
    dtype = np.uint16 if len(ids) <= np.iinfo(np.uint16).max + 1 else np.int32
    return dense.reshape(height, width).astype(dtype)


def _upsample_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres; every source id survives an upscale."""
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def segment_ids_for_sampling(labels: np.ndarray, min_area_frac: float) -> np.ndarray:
    """Ids whose area is at least ``min_area_frac`` of the image.

    Args:
        labels: [H,W] integer label map (dense ids from 0).
        min_area_frac: minimum area fraction of a sampleable segment.

    Returns:
        [K] int64 sorted ids, K >= 2.

    Raises:
        TooFewSegmentsError: fewer than two segments are large enough (the caller names the file).
    """
    counts = np.bincount(labels.ravel().astype(np.int64))
    ids = np.flatnonzero(counts >= min_area_frac * labels.size)
    if len(ids) < 2:
        raise TooFewSegmentsError(
            f"only {len(ids)} of {np.count_nonzero(counts)} superpixel(s) cover at least {min_area_frac:.2%} of the"
            f" image; a single region gives no local contrast")
    return ids.astype(np.int64)
