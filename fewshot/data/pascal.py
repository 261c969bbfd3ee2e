"""PASCAL-5i: VOC2012 images with the SBD-augmented class-index masks, four folds of five test classes.

Lists (shipped in ``splits/pascal/``, verified against ``SegmentationClassAug``):

* ``voc_sbd_merge_noduplicate.txt``: PFENet's 5,953-image training list (VOC train + SBD train_noval);
* ``val.txt``: VOC2012 segmentation val, 1,449 images, the test images of every fold.

Splits: ``train`` = the training list on the fold's 15 training classes; ``test`` = ``val.txt`` on the fold's 5
test classes; ``val`` = a deterministic ``val_fraction`` of the training list (chosen by a hash of the image
id and ``val_seed``) on the training classes, removed from ``train``, for model selection without touching
the test classes. ``fold='all'`` (or -1) uses all 20 classes everywhere (cross-domain source training).

Per-image class pixel counts are read once from the masks and cached as JSON (keyed by the list's content
and the mask folder), so the 2,048-pixel filter can change without a rescan. ``load_full`` reads an image's
whole class map (BAM's base learner, :mod:`fewshot.data.base_labels`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.images import read_rgb
from common.io import write_json
from fewshot.data.base import (
    IGNORE_INDEX,
    DataError,
    FewShotBenchmark,
    Sample,
    binary_mask,
    check_same_size,
    index_cache_dir,
    is_held_out,
    read_label,
)

SPLIT_DIR = Path(__file__).resolve().parent / "splits" / "pascal"
TRAIN_LIST, TEST_LIST = "voc_sbd_merge_noduplicate.txt", "val.txt"
PASCAL_TRAIN_LIST = SPLIT_DIR / TRAIN_LIST  # also the image list of the stage-1 VOC prior (no test image)
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
NUM_CLASSES = len(VOC_CLASSES)


def fold_classes(fold: int | str) -> tuple[list[int], list[int]]:
    """(training classes, test classes) of a fold: fold i tests 5i+1..5i+5; 'all' / -1 trains and tests on 1-20."""
    every = list(range(1, NUM_CLASSES + 1))
    if fold in ("all", -1):
        return every, every
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"PASCAL-5i fold must be 0-3, -1 or 'all', got {fold!r}")
    test = list(range(5 * int(fold) + 1, 5 * int(fold) + 6))
    return [c for c in every if c not in test], test


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file: PFENet pairs (``JPEGImages/x.jpg SegmentationClassAug/x.png``) or bare ids."""
    if not path.is_file():
        raise DataError(f"{path}: list file is missing")
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if len(ids) != len(set(ids)):
        raise DataError(f"{path}: list repeats image ids")
    return ids


def voc_folder(root: str | Path) -> Path:
    """``root/VOC2012`` when it exists (HSNet layout), else ``root`` itself."""
    root = Path(root).expanduser()
    return root / "VOC2012" if (root / "VOC2012").is_dir() else root


class Pascal5i(FewShotBenchmark):
    """One split of one PASCAL-5i fold.

    Args:
        root: folder holding ``VOC2012/`` (or the ``VOC2012`` folder itself) with ``SegmentationClassAug/`` and,
            unless ``index_only``, ``JPEGImages/``.
        fold: 0-3, or ``'all'`` / -1 for all 20 classes.
        split: ``'train'``, ``'val'`` (held-out training images) or ``'test'``.
        min_pixels: keep an (image, class) pair only if the class covers at least this many pixels.
        val_fraction, val_seed: the held-out share of the training list (0 = no ``val`` split).
        index_only: index the masks without requiring images (``load`` then fails on the missing JPEG).
        cache_dir: where the pixel-count index is cached.
        split_dir: folder with the two list files (default: the shipped PFENet lists).
    """

    name = "pascal5i"

    def __init__(self, root: str | Path, fold: int | str = 0, split: str = "train", min_pixels: int = 2048,
                 val_fraction: float = 0.1, val_seed: int = 0, index_only: bool = False,
                 cache_dir: str | Path = "", split_dir: str | Path = SPLIT_DIR) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"PASCAL-5i split must be train, val or test, got {split!r}")
        if split == "val" and val_fraction <= 0:
            raise ValueError("PASCAL-5i split 'val' needs val_fraction > 0 (it is held out of the training list)")
        self.split, self.fold, self.min_pixels = split, fold, min_pixels
        self.folder = voc_folder(root)
        self.mask_dir, self.image_dir = self.folder / "SegmentationClassAug", self.folder / "JPEGImages"
        if not self.mask_dir.is_dir():
            raise DataError(f"{self.mask_dir}: mask folder is missing (expected <root>/VOC2012/SegmentationClassAug)")
        if not index_only and not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder is missing (or pass index_only=True to count masks)")
        train_classes, test_classes = fold_classes(fold)
        self.class_ids = test_classes if split == "test" else train_classes
        self.class_names = {c: VOC_CLASSES[c - 1] for c in self.class_ids}
        list_file = Path(split_dir) / (TEST_LIST if split == "test" else TRAIN_LIST)
        ids = read_id_list(list_file)
        if split != "test" and val_fraction > 0:
            ids = [i for i in ids if is_held_out(i, val_fraction, val_seed) == (split == "val")]
        self.counts = pixel_counts(list_file, self.mask_dir, cache_dir)
        self._ids = [i for i in ids if any(self.counts[i].get(c, 0) >= min_pixels for c in self.class_ids)]
        self.samples_by_class = {c: [] for c in self.class_ids}
        for i in self._ids:
            sample = Sample(i, str(self.image_dir / f"{i}.jpg"), str(self.mask_dir / f"{i}.png"))
            for c in self.class_ids:
                if self.counts[i].get(c, 0) >= min_pixels:
                    self.samples_by_class[c].append(sample)

    def image_keys(self) -> list[str]:
        """Images with at least one kept class, in list-file order."""
        return list(self._ids)

    def query_classes(self, key: str) -> list[int]:
        """Split classes present in the image at all (PFENet draws the query class without the size filter)."""
        return [c for c in self.class_ids if self.counts[key].get(c, 0) > 0]

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 and mask ``[H, W]`` (class -> 1, 255 -> 255, else 0)."""
        label = read_label(sample.mask_path)
        check_label_values(label, sample.mask_path)
        image = read_rgb(sample.image_path)
        check_same_size(image, label, sample.image_path, sample.mask_path)
        return image, binary_mask(label, class_id)

    def load_full(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Image and the full ``SegmentationClassAug`` map as int32 (0 = background, 1-20, -1 = ignore)."""
        label = read_label(sample.mask_path)
        check_label_values(label, sample.mask_path)
        image = read_rgb(sample.image_path)
        check_same_size(image, label, sample.image_path, sample.mask_path)
        return image, np.where(label == IGNORE_INDEX, -1, label.astype(np.int32))


def check_label_values(label: np.ndarray, path: str | Path) -> None:
    """VOC labels hold 0-20 and 255 only; anything else means a wrong or corrupt mask."""
    bad = label[(label > NUM_CLASSES) & (label != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"{path}: label value {int(bad[0])} is outside the VOC classes 0-{NUM_CLASSES} and 255")


def pixel_counts(list_file: Path, mask_dir: Path, cache_dir: str | Path = "") -> dict[str, dict[int, int]]:
    """``{image id: {class: pixel count}}`` for every id of ``list_file`` (classes present only), cached as JSON.

    The cache key is the list's content plus the mask folder, so editing the list or pointing at other masks
    rebuilds it; the counts do not depend on the size filter.
    """
    content = list_file.read_bytes()
    key = hashlib.sha1(content + str(mask_dir.resolve()).encode()).hexdigest()[:16]
    cache = index_cache_dir(cache_dir) / f"pascal_{list_file.stem}_{key}.json"
    if cache.is_file():
        try:
            return {i: {int(c): n for c, n in row.items()} for i, row in json.loads(cache.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass  # a damaged cache is rebuilt below
    counts = {}
    for i in tqdm(read_id_list(list_file), desc=f"indexing {list_file.name}", leave=False, mininterval=5):
        path = mask_dir / f"{i}.png"
        label = read_label(path)
        check_label_values(label, path)
        hist = np.bincount(label.ravel(), minlength=256)
        counts[i] = {c: int(hist[c]) for c in range(1, NUM_CLASSES + 1) if hist[c]}
    write_json(cache, counts, indent=None)
    return counts
