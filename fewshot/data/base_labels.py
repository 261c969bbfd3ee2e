"""Full multi-class label maps of a benchmark's images, remapped to a base learner's classes (BAM).

BAM's base learner is an ordinary semantic segmenter over the fold's *base* (training) classes plus background.
It needs every class of an image at once, not the binary mask of one episode class:

* :func:`load_full` reads an image and its full label map ``int32 [H, W]`` in the benchmark's own class-id space
  (``IGNORE = -1`` for ignore, any value that is no class id for background). PASCAL reads its
  ``SegmentationClassAug`` map, COCO rasterises the instances JSON per image (cached as PNGs, see
  :meth:`fewshot.data.coco.Coco20i.load_full`), the semantic layout reads its label PNG; :class:`MultiSource`
  keys get their source's global ids (``1000 * (i + 1) + id``). A benchmark without full maps (FSS-1000,
  synthetic: one class per image) gets the union of the binary masks of the classes its image is indexed under.
* :func:`base_channels` numbers the base classes (the training split's, one channel per class name across
  sources) and :func:`remap_to_base` maps a label to them: base class -> its channel 1..n, ignore -> 255,
  everything else (background, and every novel class: test and validation classes) -> 0.
* :class:`BaseLabelDataset` is the base stage's training set: each image of the training split once per epoch
  (seeded order), augmented by the same transform as episodes.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewshot.data.base import IGNORE_INDEX, DataError, FewShotBenchmark
from fewshot.data.loader import single_thread
from fewshot.data.sources import ID_STRIDE, ClassSubset, MultiSource, normalise_name

IGNORE = -1        # ignore in a full label map (class ids may exceed 255: FSS-1000, several sources)
BACKGROUND = -2    # background where a benchmark has no value of its own for it
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[Tensor, Tensor]]


def load_full(bench: FewShotBenchmark, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 ``[H, W, 3]`` and full label map int32 ``[H, W]`` (class ids of ``bench``, -1 ignore)."""
    if isinstance(bench, MultiSource):  # the source's own map, shifted to the global ids
        i, inner = bench._split_key(key)
        image, label = load_full(bench.parts[i][2], inner)
        return image, np.where(label >= 0, label + ID_STRIDE * (i + 1), label).astype(np.int32)
    if isinstance(bench, ClassSubset):  # the restriction changes which classes are tasks, not the pixels
        return load_full(bench.base, key)
    sample = bench.sample(key)
    own = getattr(bench, "load_full", None)
    if own is not None:
        return own(sample)
    label, image = None, None
    for c in bench.query_classes(key):
        image, mask = bench.load(sample, c)
        if label is None:
            label = np.full(mask.shape, BACKGROUND, np.int32)
        label[mask == 1] = c
        label[(mask == IGNORE_INDEX) & (label == BACKGROUND)] = IGNORE
    if label is None:
        raise DataError(f"{sample.mask_path}: image {key!r} has no class of {bench!r}, so no label map")
    return image, label


def base_channels(bench: FewShotBenchmark) -> dict[int, int]:
    """``class id -> base-learner channel`` (1..n) for the classes of ``bench`` (the training split): one channel
    per normalised class name, so a class several sources share (COCO's "car" in three sets) is one class."""
    channels: dict[str, int] = {}
    out = {}
    for c in bench.class_ids:
        name = str(bench.class_names.get(c, c))
        if isinstance(bench, MultiSource):
            name = name.split(":", 1)[1]  # "<source>:<name>"
        out[c] = channels.setdefault(normalise_name(name), len(channels) + 1)
    return out


def remap_to_base(label: np.ndarray, channel_of: dict[int, int]) -> np.ndarray:
    """Full label ``[H, W]`` -> uint8 base-learner target: class ``c`` -> ``channel_of[c]``, ``IGNORE`` -> 255, any
    other value (background, every novel class) -> 0."""
    if channel_of and max(channel_of.values()) >= IGNORE_INDEX:
        raise ValueError(f"{max(channel_of.values())} base channels do not fit a uint8 label with 255 = ignore")
    out = np.zeros(label.shape, np.uint8)
    for c, j in channel_of.items():
        out[label == c] = j
    out[label == IGNORE] = IGNORE_INDEX
    return out


def gfss_target(label: np.ndarray, channel_of: dict[int, int], novel_id: int) -> np.ndarray:
    """Generalized FSS target: :func:`remap_to_base`, and the episode's novel class -> ``n + 1`` (n = the number
    of base channels)."""
    if novel_id in channel_of:
        raise ValueError(f"class {novel_id} is a base class; a generalized FSS episode asks about a novel one")
    out = remap_to_base(label, channel_of)
    out[label == novel_id] = max(channel_of.values(), default=0) + 1
    return out


class BaseLabelDataset(Dataset):
    """Item ``i``: image ``keys[i]`` augmented, with its base-learner target.

    Returns ``{"image": float [3,S,S], "label": int64 [S,S] in 0..n / 255, "key"}``; with ``on_bad_sample='skip'``
    a bad image becomes ``{"skipped": reason}`` (as :class:`fewshot.data.loader.EpisodeDataset`). The
    augmentation of item ``i`` is seeded by ``(seed, epoch, i)`` alone.
    """

    def __init__(self, bench: FewShotBenchmark, keys: list[str], channel_of: dict[int, int], transform: Transform,
                 seed: int = 0, epoch: int = 0, on_bad_sample: Literal["error", "skip"] = "error") -> None:
        self.bench, self.keys, self.channel_of, self.transform = bench, keys, dict(channel_of), transform
        self.seed, self.epoch, self.on_bad_sample = seed, epoch, on_bad_sample

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            with single_thread():
                image, label = load_full(self.bench, self.keys[index])
                target = remap_to_base(label, self.channel_of)
                rng = np.random.default_rng([self.seed, self.epoch, index])
                image_t, label_t = self.transform(image, target, rng)
        except DataError as err:
            if self.on_bad_sample == "error":
                raise
            warnings.warn(f"skipped image {index}: {err}", stacklevel=2)
            return {"skipped": f"image {index} ({self.keys[index]}): {err}"}
        return {"image": image_t, "label": label_t, "key": self.keys[index]}


def epoch_images(bench: FewShotBenchmark, seed: int, epoch: int, count: int = 0) -> list[str]:
    """The training split's images in a fresh order per epoch (``seed + epoch``); ``count`` > 0 wraps around."""
    keys = bench.image_keys()
    if not keys:
        raise DataError(f"{bench!r}: no training image for the base learner")
    random.Random(seed + epoch).shuffle(keys)
    return [keys[i % len(keys)] for i in range(count)] if count else keys


def base_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; ``size`` = images kept, ``skipped`` = the reasons of the others."""
    kept = [x for x in items if "skipped" not in x]
    batch: dict[str, Any] = {"size": len(kept), "skipped": [x["skipped"] for x in items if "skipped" in x]}
    if kept:
        batch["image"] = torch.stack([x["image"] for x in kept])
        batch["label"] = torch.stack([x["label"] for x in kept])
        batch["key"] = [x["key"] for x in kept]
    return batch
