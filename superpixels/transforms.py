"""Augmentations that keep superpixel ids attached to the pixels they label.

Design B ("pooled"): :class:`JointViewTransform` crops, resizes and flips an image and its label map with one
draw of parameters (bilinear for the image, pixel-centre nearest for the labels), then colours the image only.
Design A ("patch"): :func:`sample_segment_crop` cuts one superpixel's bounding box out of the original image;
the caller augments that crop like any MoCo-v2 input (e.g. lightly's ``MoCoV2Transform(input_size=112)``).

Randomness comes only from the global torch RNG (geometry, jitter, grayscale), the global numpy RNG (blur, via
lightly's PIL blur) and a passed numpy Generator, so seeding those per sample makes a sample reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lightly.transforms import GaussianBlur
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from common.config import field


@dataclass(frozen=True)
class PhotometricConfig:
    """Colour augmentation of one view; the defaults are MoCo-v2's (``--aug-plus``)."""

    jitter_prob: float = field(0.8, help="probability of colour jitter")
    brightness: float = field(0.4, help="colour jitter brightness strength")
    contrast: float = field(0.4, help="colour jitter contrast strength")
    saturation: float = field(0.4, help="colour jitter saturation strength")
    hue: float = field(0.1, help="colour jitter hue strength (at most 0.5)")
    grayscale_prob: float = field(0.2, help="probability of converting the view to grayscale")
    blur_prob: float = field(0.5, help="probability of Gaussian blur")
    blur_sigma: tuple[float, float] = field((0.1, 2.0), help="blur sigma range; PIL radius = sigma, as in MoCo")


def build_photometric(cfg: PhotometricConfig) -> v2.Compose:
    """PIL -> PIL colour pipeline: jitter, grayscale, blur.

    lightly's ``DetConSTransform`` carries BYOL-strength jitter and a 23-px torchvision blur, so the MoCo-v2
    pipeline is assembled here from torchvision v2 pieces and lightly's PIL blur instead.
    """
    jitter = v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue)
    return v2.Compose([
        v2.RandomApply([jitter], p=cfg.jitter_prob),
        v2.RandomGrayscale(p=cfg.grayscale_prob),
        GaussianBlur(prob=cfg.blur_prob, sigmas=cfg.blur_sigma),
    ])


class JointViewTransform:
    """One augmented view of an image and its superpixel label map, with ids kept aligned.

    Args:
        size: output side S.
        min_scale: smallest crop area fraction of RandomResizedCrop.
        hflip_prob: horizontal flip probability.
        photometric: colour augmentation of the image (None: none).
        normalize: ``{"mean": [...], "std": [...]}`` (None: the view stays in [0, 1]).

    Call with a PIL image of size (W,H) and a label map [H,W]; returns ``(view [3,S,S] float32,
    labels [S,S] int64)``. Call it twice on the same pair for the two views of design B.
    """

    def __init__(self, size: int, min_scale: float = 0.2, hflip_prob: float = 0.5,
                 photometric: PhotometricConfig | None = PhotometricConfig(),
                 normalize: dict[str, list[float]] | None = IMAGENET_NORMALIZE) -> None:
        self.size, self.scale, self.hflip_prob = size, (min_scale, 1.0), hflip_prob
        self.photometric = build_photometric(photometric) if photometric is not None else None
        to_tensor: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if normalize is not None:
            to_tensor.append(v2.Normalize(mean=normalize["mean"], std=normalize["std"]))
        self.to_tensor = v2.Compose(to_tensor)

    def __call__(self, image: Image.Image, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, labels)
        # One crop/flip draw for both, applied by hand: v2's Mask kernel resizes with NEAREST, whose floor
        # sampling shifts labels up to half a view pixel against the bilinear image; NEAREST_EXACT samples
        # pixel centres as the image does, so region interiors line up exactly.
        top, left, height, width = RandomResizedCrop.get_params(image, scale=list(self.scale),
                                                                ratio=[3 / 4, 4 / 3])
        out = [self.size, self.size]
        image = image if image.mode == "RGB" else image.convert("RGB")
        view = F.resized_crop(image, top, left, height, width, out, InterpolationMode.BILINEAR, antialias=True)
        crop = torch.from_numpy(labels[top:top + height, left:left + width].astype(np.int64))[None]  # [1,h,w]
        view_labels = F.resize(crop, out, InterpolationMode.NEAREST_EXACT)[0]
        if torch.rand(1).item() < self.hflip_prob:
            view, view_labels = F.horizontal_flip(view), view_labels.flip(-1)
        if self.photometric is not None:
            view = self.photometric(view)
        return self.to_tensor(view), view_labels


def sample_segment_crop(image: Image.Image, labels: np.ndarray, ids: np.ndarray,
                        rng: np.random.Generator) -> Image.Image:
    """Design A: crop the tight bounding box of one superpixel, context pixels kept (not masked).

    Args:
        image: PIL image of size (W,H).
        labels: [H,W] label map of ``image``.
        ids: [K] sampleable ids (see ``segment_ids_for_sampling``); one is drawn uniformly.
        rng: source of the draw.

    Returns:
        The PIL crop of the chosen segment's bounding box.
    """
    _check_pair(image, labels)
    if len(ids) == 0:
        raise ValueError("no sampleable superpixel ids to choose from")
    top, left, bottom, right = segment_box(labels, int(ids[rng.integers(len(ids))]))
    return image.crop((left, top, right, bottom))


def segment_box(labels: np.ndarray, segment: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` (bottom / right exclusive) of one superpixel id's tight bounding box."""
    inside = labels == segment
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if len(rows) == 0:
        raise ValueError(f"superpixel id {segment} does not occur in the label map")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _check_pair(image: Image.Image, labels: np.ndarray) -> None:
    if labels.shape != (image.height, image.width):
        raise ValueError(f"label map of shape {labels.shape} does not match the image size (H,W) = "
                         f"{(image.height, image.width)}; was the cache built from a different file or with EXIF"
                         " rotation applied?")
