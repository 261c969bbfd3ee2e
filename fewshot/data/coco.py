"""COCO-20i read straight from the COCO instances JSON: no offline PNG generation step.

Layout (2014 or 2017 naming; ``root`` may be the COCO folder itself or hold ``COCO2014/`` / ``COCO2017/``)::

    annotations/instances_{train,val}{year}.json
    {train,val}{year}/<file_name from the JSON>

The 80 category ids are mapped to 1..80 in id order. Folds are the interleaved split-COCO folds (fold i tests
{4k + i + 1 : k = 0..19}). An (image, class) pair is kept when the union of the class's non-crowd instance
masks covers ``min_pixels``; the union areas come from RLE merges (no dense decode) and are cached per
annotation file. Masks are built on the fly from polygons / RLE; crowd regions of the chosen class that no
instance covers become 255 (ignored). Splits: ``train`` / ``val`` (held-out share of train, training
classes) from the train JSON, ``test`` from the val JSON on the fold's test classes. Full label maps of every
class (BAM's base learner, :mod:`fewshot.data.base_labels`) are rasterised per image on first use and cached as
PNGs next to the index (``coco_labels_<annotation file>_<key>/<image id>.png``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm import tqdm

from common.images import read_rgb
from common.io import write_bytes, write_json
from fewshot.data.base import (
    IGNORE_INDEX,
    DataError,
    FewShotBenchmark,
    Sample,
    check_same_size,
    index_cache_dir,
    is_held_out,
)

NUM_CLASSES = 80


def fold_classes(fold: int | str) -> tuple[list[int], list[int]]:
    """(training classes, test classes) of a split-COCO fold; 'all' / -1 = all 80 for both."""
    every = list(range(1, NUM_CLASSES + 1))
    if fold in ("all", -1):
        return every, every
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"COCO-20i fold must be 0-3, -1 or 'all', got {fold!r}")
    test = [4 * k + int(fold) + 1 for k in range(20)]
    return [c for c in every if c not in test], test


def coco_folder(root: str | Path, year: str) -> Path:
    """``root/COCO<year>`` when it exists, else ``root``."""
    root = Path(root).expanduser()
    for name in ([f"COCO{year}"] if year != "auto" else ["COCO2014", "COCO2017"]):
        if (root / name).is_dir():
            return root / name
    return root


def annotation_file(folder: Path, part: str, year: str) -> tuple[Path, str]:
    """(``annotations/instances_<part><year>.json``, year); 'auto' prefers 2014."""
    for y in ([year] if year != "auto" else ["2014", "2017"]):
        path = folder / "annotations" / f"instances_{part}{y}.json"
        if path.is_file():
            return path, y
    raise DataError(f"{folder / 'annotations'}: no instances_{part}{'2014/2017' if year == 'auto' else year}.json")


def load_coco(path: Path) -> COCO:
    """pycocotools' index of one annotation file (its progress prints are swallowed)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a readable COCO instances file ({err})") from err


class Coco20i(FewShotBenchmark):
    """One split of one COCO-20i fold.

    Args:
        root: COCO folder (or its parent holding ``COCO2014/``/``COCO2017/``).
        fold: 0-3, or ``'all'`` / -1.
        split: ``'train'``, ``'val'`` (held-out training images) or ``'test'``.
        year: ``'2014'``, ``'2017'`` or ``'auto'``.
        min_pixels: size filter on the per-class union of instance masks.
        val_fraction, val_seed: the held-out share of the training images (0 = no ``val`` split).
        cache_dir: where the union-area index is cached.
    """

    name = "coco20i"

    def __init__(self, root: str | Path, fold: int | str = 0, split: str = "train", year: str = "auto",
                 min_pixels: int = 2048, val_fraction: float = 0.1, val_seed: int = 0,
                 cache_dir: str | Path = "") -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"COCO-20i split must be train, val or test, got {split!r}")
        if split == "val" and val_fraction <= 0:
            raise ValueError("COCO-20i split 'val' needs val_fraction > 0 (it is held out of the training images)")
        self.split, self.fold, self.min_pixels, self.cache_dir = split, fold, min_pixels, cache_dir
        folder = coco_folder(root, year)
        part = "val" if split == "test" else "train"
        self.annotation_path, self.year = annotation_file(folder, part, year)
        self.image_dir = folder / f"{part}{self.year}"
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder is missing")
        index = union_areas(self.annotation_path, cache_dir)
        self.category_ids = index["category_ids"]  # COCO category id of class c is category_ids[c - 1]
        train_classes, test_classes = fold_classes(fold)
        self.class_ids = test_classes if split == "test" else train_classes
        self.class_names = {c: index["category_names"][c - 1] for c in self.class_ids}
        self.image_ids: dict[str, int] = {}
        self.areas: dict[str, dict[int, int]] = {}
        self.samples_by_class = {c: [] for c in self.class_ids}
        for image_id, file_name, areas in index["images"]:
            key = Path(file_name).stem
            if split != "test" and is_held_out(key, val_fraction, val_seed) != (split == "val"):
                continue
            kept = [c for c in self.class_ids if areas.get(str(c), 0) >= min_pixels]
            if not kept:
                continue
            self.image_ids[key] = image_id
            self.areas[key] = {int(c): n for c, n in areas.items()}
            sample = Sample(key, str(self.image_dir / file_name), str(self.annotation_path))
            for c in kept:
                self.samples_by_class[c].append(sample)

    @cached_property
    def coco(self) -> COCO:
        """The annotation index, loaded on first use in each process."""
        return load_coco(self.annotation_path)

    def image_keys(self) -> list[str]:
        """Images with at least one kept class, in annotation-file order."""
        return list(self.image_ids)

    def query_classes(self, key: str) -> list[int]:
        """Split classes with any instance pixels in the image (no size filter, as in PFENet)."""
        return [c for c in self.class_ids if self.areas[key].get(c, 0) > 0]

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 and the class mask built from the instance annotations."""
        mask = self.class_mask(self.image_ids[sample.key], class_id)
        image = read_rgb(sample.image_path)
        check_same_size(image, mask, sample.image_path, f"{sample.mask_path} (image id {self.image_ids[sample.key]})")
        return image, mask

    def class_mask(self, image_id: int, class_id: int) -> np.ndarray:
        """uint8 ``[H, W]``: union of the class's instances -> 1, its crowd regions (not covered) -> 255."""
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, catIds=[self.category_ids[class_id - 1]]))
        mask = np.zeros((h, w), np.uint8)
        for crowd, value in ((1, IGNORE_INDEX), (0, 1)):  # instances are painted last and win over crowd
            rles = [self.coco.annToRLE(a) for a in anns if int(a.get("iscrowd", 0)) == crowd]
            if rles:
                mask[mask_utils.decode(mask_utils.merge(rles)) > 0] = value
        return mask

    def load_full(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Image and its full label map int32 (0 = background, classes 1-80, -1 = crowd not covered by an
        instance), rasterised once per image and cached as a PNG beside the union-area index."""
        image_id = self.image_ids[sample.key]
        cache = self._label_cache / f"{image_id}.png"
        label = None
        if cache.is_file():
            try:
                label = np.asarray(Image.open(cache), dtype=np.uint8)
            except (OSError, ValueError):
                label = None  # a damaged cache file is rebuilt below
        if label is None:
            label = self.rasterise(image_id)
            buffer = io.BytesIO()
            Image.fromarray(label, mode="L").save(buffer, format="PNG")
            write_bytes(cache, buffer.getvalue())
        image = read_rgb(sample.image_path)
        check_same_size(image, label, sample.image_path, f"{sample.mask_path} (image id {image_id})")
        return image, np.where(label == IGNORE_INDEX, -1, label.astype(np.int32))

    def rasterise(self, image_id: int) -> np.ndarray:
        """uint8 ``[H, W]`` of every class: instances painted largest first (a small object on a large one stays
        visible), crowd regions no instance covers -> 255."""
        info = self.coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), np.uint8)
        class_of = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        crowd = [self.coco.annToRLE(a) for a in anns if int(a.get("iscrowd", 0))]
        if crowd:
            label[mask_utils.decode(mask_utils.merge(crowd)) > 0] = IGNORE_INDEX
        instances = [(self.coco.annToRLE(a), class_of[a["category_id"]]) for a in anns if not int(a.get("iscrowd", 0))]
        for rle, c in sorted(instances, key=lambda x: -int(mask_utils.area(x[0]))):
            label[mask_utils.decode(rle) > 0] = c
        return label

    @cached_property
    def _label_cache(self) -> Path:
        stat = self.annotation_path.stat()
        key = hashlib.sha1(f"{self.annotation_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return index_cache_dir(self.cache_dir) / f"coco_labels_{self.annotation_path.stem}_{key.hexdigest()[:16]}"


def union_areas(path: Path, cache_dir: str | Path = "") -> dict:
    """Per image, per class (1..80) union area of the non-crowd instances, plus the category table; cached.

    Returns ``{"category_ids": [...80], "category_names": [...], "images": [[image_id, file_name,
    {class: area}], ...]}`` with images in file order; images without non-crowd instances are left out.
    """
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = index_cache_dir(cache_dir) / f"coco_{path.stem}_{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    coco = load_coco(path)
    cats = sorted(coco.cats)
    if len(cats) != NUM_CLASSES:
        raise DataError(f"{path}: {len(cats)} categories, expected the {NUM_CLASSES} COCO classes")
    class_of = {cat: i + 1 for i, cat in enumerate(cats)}
    images = []
    for image_id in tqdm(list(coco.imgs), desc=f"indexing {path.name}", leave=False, mininterval=5):
        by_class: dict[int, list] = {}
        for ann in coco.imgToAnns.get(image_id, []):
            try:
                if not int(ann.get("iscrowd", 0)):
                    by_class.setdefault(class_of[ann["category_id"]], []).append(coco.annToRLE(ann))
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise DataError(f"{path}: annotation {ann.get('id')} of image {image_id} is malformed "
                                f"({err!r})") from err
        areas = {str(c): int(mask_utils.area(mask_utils.merge(rles))) for c, rles in sorted(by_class.items())}
        if areas:
            images.append([image_id, coco.imgs[image_id]["file_name"], areas])
    index = {"category_ids": cats, "category_names": [coco.cats[c]["name"] for c in cats], "images": images}
    write_json(cache, index, indent=None)
    return index
