"""A generic semantic-segmentation folder as a few-shot benchmark (``data.benchmark=semantic``).

Layout::

    ROOT/images/<id>.jpg          (or .jpeg / .png; one image per id)
    ROOT/labels/<id>.png          single-channel uint8 class ids (PNG mode L or P)
    ROOT/classes.json             {"classes": {"<id>": "<name>", ...},   every class, ids 0-254
                                   "ignore": 254 or [250, 254],          optional; 255 is always ignore
                                   "splits": {"train": [<id>, ...],      optional image lists
                                              "val": [...], "test": [...]}}

Pixel values: a value listed under ``classes`` is that class; 255 and the ``ignore`` values are ignore (255 in
the episode mask); any other value is background, as the layout's README says (coco128 lists 1-80, so its 0 is
background; camvid lists 0 = sky, so it has no background value). Unlisted values other than 0 are allowed but
warned about once, since they usually mean ids shifted by one between the labels and ``classes.json``.

``load_full`` returns an image's whole label as class ids (ignore -> -1) for BAM's base learner
(:mod:`fewshot.data.base_labels`).

Tasks: one binary task per (image, class present in it): the class is 1, every other class and background 0,
ignore 255. A pair is indexed when the class covers at least ``min_pixels`` pixels (and at least one, so
``min_pixels=0`` keeps every present class); PASCAL-5i uses 2*32*32. Unlike PASCAL-5i / COCO-20i, where a query
may also ask about a class below the size filter, :meth:`SemanticFolder.query_classes` returns the indexed
classes of the image only.

Class splits (train / val / test classes), by exactly one of:

* ``classes={"train": [...], "val": [...], "test": [...]}``: class names or ids (a name wins over an id when a
  string is both). An omitted ``train`` means every class named in neither ``val`` nor ``test``; an omitted
  ``val`` / ``test`` means none. A class in two lists is an error naming it.
* ``folds=k`` with ``fold=i`` (0 <= i < k): the listed class ids sorted, the class at position p is a test class
  of fold i when ``p % k == i``, the others are training classes (k=4 on the COCO ids 1-80 gives COCO-20i's
  interleaved folds).
* ``fold='all'`` (or -1), with or without ``folds``: every class is a training class and a test class (source
  training for cross-domain tests, or a seen-class evaluation).

Validation classes, held out of training so that model selection sees classes no training episode used: either
an explicit list (``val_classes`` or ``classes['val']``) or ``val_fraction_classes=f``: ``max(1, round(f * n))``
of the n training classes, those ranked first by ``sha1(f"{val_seed}:{name}")`` (the hash of ``is_held_out``,
ranked rather than thresholded so that a small class set still gets its exact share). Either way they leave the
training classes, and they must not be test classes (except with ``fold='all'``, where test covers every class).
Without validation classes, split ``val`` exists only when ``classes.json`` has a ``val`` image list, and is then
the training classes on those images.

Image splits: with ``splits`` in ``classes.json``, split s uses only the ids of ``splits[s]`` (in list order;
every id must exist and belong to one list only; images in no list are unused), so images of split 'test' are
only used for test episodes. Without it every image serves every split (sorted by id) and the class split alone
separates them: an image holding a test class may still be a training image for its other classes, with the
test-class pixels as background, as in PASCAL-5i.

Index: every label PNG is read once (``np.bincount``) and every image header once for its size; the result is
cached as JSON under :func:`index_cache_dir`, keyed by the root path and the names, sizes and mtimes of all
image and label files. The counts do not depend on ``min_pixels`` or the class split, so changing those reuses
the cache.

Bad input raises :class:`DataError` at construction, naming the file or class: missing root / ``images`` /
``labels`` / ``classes.json``, malformed ``classes.json``, a label that is not single-channel uint8 or is
unreadable, an image without a label or a label without an image, image and label sizes that differ (checked
again at load time), an unknown class in a split list, a class in two splits, split image lists naming unknown
ids. A class of the split with fewer than 2 images (no query + support pair) is a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
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
    read_label,
)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASSES_FILE = "classes.json"
CLASSES_KEYS = ("classes", "ignore", "splits")
INDEX_VERSION = 1  # bump when the cached index format changes


# --------------------------------------------------------------------------------------------------
# classes.json


def read_classes_json(path: Path) -> tuple[dict[int, str], set[int], dict[str, list[str]] | None]:
    """``(class id -> name, ignore values (255 included), split -> image ids or None)`` from ``classes.json``."""
    example = '{"classes": {"1": "person", "2": "car"}}'
    if not path.is_file():
        raise DataError(f"{path}: {CLASSES_FILE} is missing; write one listing every class id and its name, "
                        f"e.g. {example}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object like {example}, got {type(data).__name__}")
    unknown = [k for k in data if k not in CLASSES_KEYS]
    if unknown:
        raise DataError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(CLASSES_KEYS)})")
    raw = data.get("classes")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'classes' must be a non-empty mapping of class id -> name, like {example}")
    classes: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for key, name in raw.items():
        cid = _int_value(key)
        if cid is None or not 0 <= cid < IGNORE_INDEX:
            raise DataError(f"{path}: class id {key!r} is not an integer 0-254 (255 is reserved for ignore)")
        if cid in classes:
            raise DataError(f"{path}: class id {cid} is listed twice")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: class {cid} needs a non-empty name string, got {name!r}")
        name = name.strip()
        if name in by_name:
            raise DataError(f"{path}: class name {name!r} is used by ids {by_name[name]} and {cid}")
        classes[cid], by_name[name] = name, cid
    ignore_raw = data.get("ignore", [])
    ignore_list = ignore_raw if isinstance(ignore_raw, list) else [ignore_raw]
    ignore = {IGNORE_INDEX}
    for value in ignore_list:
        v = _int_value(value) if not isinstance(value, str) else None
        if v is None or not 0 <= v <= IGNORE_INDEX:
            raise DataError(f"{path}: 'ignore' must be a pixel value 0-255 or a list of them, got {ignore_raw!r}")
        if v in classes:
            raise DataError(f"{path}: value {v} is both class {classes[v]!r} and an 'ignore' value")
        ignore.add(v)
    splits = data.get("splits")
    if splits is not None:
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise DataError(f"{path}: 'splits' must map split names to lists of image ids, like "
                            f'{{"train": ["a", "b"], "test": ["c"]}}')
        bad = [k for k in splits if k not in SPLITS]
        if bad:
            raise DataError(f"{path}: 'splits' has split {bad[0]!r}; splits are {', '.join(SPLITS)}")
        splits = {k: [str(i) for i in v] for k, v in splits.items()}
        seen: dict[str, str] = {}
        for split, ids in splits.items():
            for i in ids:
                if i in seen:
                    where = "twice in" if seen[i] == split else f"in both {seen[i]!r} and"
                    raise DataError(f"{path}: image id {i!r} is listed {where} {split!r} under 'splits'")
                seen[i] = split
    return classes, ignore, splits


def _int_value(value: Any) -> int | None:
    """``value`` as an int when it is one (or a string of one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


# --------------------------------------------------------------------------------------------------
# files and index


def list_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """``id -> (image path, label path)`` sorted by id; every image needs a label and every label an image."""
    image_dir, label_dir = root / "images", root / "labels"
    for folder, what in ((image_dir, "images/<id>.jpg"), (label_dir, "labels/<id>.png")):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder is missing (the semantic layout needs <root>/{what})")
    images: dict[str, Path] = {}
    for p in image_dir.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in images:
            raise DataError(f"{p}: two images for id {p.stem!r} ({images[p.stem].name} and {p.name}); keep one")
        images[p.stem] = p
    labels = {p.stem: p for p in label_dir.iterdir()
              if not p.name.startswith(".") and p.suffix.lower() == ".png" and p.is_file()}
    for i in sorted(images):
        if i not in labels:
            raise DataError(f"{images[i]}: image has no label (expected {label_dir / (i + '.png')})")
    for i in sorted(labels):
        if i not in images:
            raise DataError(f"{labels[i]}: label has no image (expected {image_dir / i}.jpg or .png)")
    if not images:
        raise DataError(f"{image_dir}: no images (<id>.jpg / .jpeg / .png) found")
    return {i: (images[i], labels[i]) for i in sorted(images)}


def scan_labels(pairs: dict[str, tuple[Path, Path]]) -> dict[str, dict[str, Any]]:
    """Read every label once: ``id -> {"counts": {value: pixels}, "label_hw": [H, W], "image_hw": [H, W]}``.

    Only values present are kept. The image is opened for its header (size) only, not decoded.
    """
    index = {}
    for i, (image_path, label_path) in tqdm(pairs.items(), desc="indexing labels", leave=False, mininterval=5):
        label = read_label(label_path)  # DataError naming the file when unreadable or not mode L / P
        if label.ndim != 2:
            raise DataError(f"{label_path}: label must be single-channel uint8, got shape {label.shape}")
        hist = np.bincount(label.ravel(), minlength=256)
        try:
            with Image.open(image_path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{image_path}: image file is unreadable ({err})") from err
        index[i] = {"counts": {str(v): int(hist[v]) for v in np.flatnonzero(hist)},
                    "label_hw": list(label.shape), "image_hw": [height, width]}
    return index


def load_index(root: Path, pairs: dict[str, tuple[Path, Path]], cache_dir: str | Path = "") -> dict[str, dict]:
    """:func:`scan_labels` of ``pairs``, read from / written to the JSON cache when the files are unchanged."""
    stats = []
    for image_path, label_path in pairs.values():
        for p in (image_path, label_path):
            st = p.stat()
            stats.append((f"{p.parent.name}/{p.name}", st.st_size, st.st_mtime_ns))
    payload = json.dumps([INDEX_VERSION, str(root.resolve()), stats], separators=(",", ":"))
    key = hashlib.sha1(payload.encode()).hexdigest()[:16]
    cache = index_cache_dir(cache_dir) / f"semantic_{root.resolve().name}_{key}.json"
    if cache.is_file():
        try:
            index = json.loads(cache.read_text())
            if isinstance(index, dict) and set(index) == set(pairs):
                return index
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    index = scan_labels(pairs)
    try:
        write_json(cache, index, indent=None)
    except OSError as err:  # a read-only cache folder only costs a rescan next time
        warnings.warn(f"{cache}: could not write the index cache ({err})", stacklevel=2)
    return index


# --------------------------------------------------------------------------------------------------
# the benchmark


class SemanticFolder(FewShotBenchmark):
    """One split of a semantic-segmentation folder as binary few-shot tasks (see the module docstring).

    Args:
        root: folder holding ``images/``, ``labels/`` and ``classes.json``.
        split: ``'train'``, ``'val'`` or ``'test'``.
        fold: with ``folds=k``, the fold 0..k-1 whose classes are the test classes; ``'all'`` / -1 = every class
            in train and test. Ignored with explicit ``classes``.
        folds: number of interleaved class folds (0 = none: explicit ``classes`` or ``fold='all'``).
        classes: explicit class split ``{"train": [...], "val": [...], "test": [...]}`` by name or id.
        val_classes: validation classes by name or id (taken out of the training classes).
        val_fraction_classes: share of the training classes moved to validation (0 = none).
        val_seed: seed of that share.
        min_pixels: keep an (image, class) pair only if the class covers at least this many pixels.
        cache_dir: where the label index is cached.

    Attributes beyond the base contract: ``train_classes``, ``val_classes``, ``test_classes`` (ids) and
    ``all_class_names`` (every class of ``classes.json``).
    """

    name = "semantic"

    def __init__(self, root: str | Path, split: str = "train", fold: int | str = "all", folds: int = 0,
                 classes: dict[str, list[str | int]] | None = None, val_classes: list[str | int] | None = None,
                 val_fraction_classes: float = 0.0, val_seed: int = 0, min_pixels: int = 2048,
                 cache_dir: str | Path = "") -> None:
        if split not in SPLITS:
            raise ValueError(f"semantic split must be train, val or test, got {split!r}")
        if min_pixels < 0:
            raise ValueError(f"min_pixels={min_pixels} must be >= 0")
        if not 0.0 <= val_fraction_classes < 1.0:
            raise ValueError(f"val_fraction_classes={val_fraction_classes} must be in [0, 1)")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: semantic dataset folder is missing (expected images/, labels/ and "
                            f"{CLASSES_FILE} inside)")
        self.split, self.fold, self.min_pixels = split, fold, min_pixels
        self.classes_file = self.root / CLASSES_FILE
        self.all_class_names, self.ignore_values, image_splits = read_classes_json(self.classes_file)
        self._by_name = {n: c for c, n in self.all_class_names.items()}

        self.train_classes, self.val_classes, self.test_classes = self._class_split(
            fold, folds, classes, val_classes, val_fraction_classes, val_seed)
        if split == "val" and not self.val_classes:
            if image_splits is None or "val" not in image_splits:
                raise DataError(f"{self.classes_file}: split 'val' has no classes: give validation classes "
                                f"(data.val_classes, data.val_class_fraction or data.semantic_classes.val), or "
                                f"a 'val' image list under 'splits'")
            self.val_classes = list(self.train_classes)  # held-out images of the training classes
        self.class_ids = {"train": self.train_classes, "val": self.val_classes, "test": self.test_classes}[split]
        if not self.class_ids:
            raise DataError(f"{self.classes_file}: split {split!r} has no classes under this class split")
        self.class_names = {c: self.all_class_names[c] for c in self.class_ids}

        pairs = list_pairs(self.root)
        self.index = load_index(self.root, pairs, cache_dir)
        self._check_index(pairs)
        if image_splits is not None:
            if split not in image_splits:
                raise DataError(f"{self.classes_file}: 'splits' has no {split!r} image list (it has "
                                f"{', '.join(image_splits)})")
            missing = [i for i in image_splits[split] if i not in pairs]
            if missing:
                raise DataError(f"{self.classes_file}: {len(missing)} image id(s) of split {split!r} under 'splits' "
                                f"have no image in {self.root / 'images'}, e.g. {missing[0]!r}")
            ids = image_splits[split]
        else:
            ids = list(pairs)

        self.samples_by_class = {c: [] for c in self.class_ids}
        self._kept: dict[str, list[int]] = {}
        for i in ids:
            counts = self.index[i]["counts"]
            kept = [c for c in self.class_ids if counts.get(str(c), 0) >= max(min_pixels, 1)]
            if not kept:
                continue
            image_path, label_path = pairs[i]
            sample = Sample(i, str(image_path), str(label_path))
            self._kept[i] = kept
            for c in kept:
                self.samples_by_class[c].append(sample)
        few = [c for c in self.class_ids if len(self.samples_by_class[c]) < 2]
        if few:
            listed = ", ".join(f"{self.class_names[c]} (id {c}): {len(self.samples_by_class[c])}" for c in few)
            warnings.warn(f"{self.root} split {split!r}: {len(few)} class(es) have fewer than 2 indexed images "
                          f"(class covering >= {max(min_pixels, 1)} pixels), so no query + support pair: {listed}",
                          stacklevel=2)

    # ----------------------------------------------------------------------------------------------

    def _resolve(self, tokens: Iterable[str | int], what: str) -> list[int]:
        """Class names / ids -> sorted unique ids; an unknown one is a DataError naming it."""
        out = set()
        for token in tokens:
            text = str(token).strip()
            if not isinstance(token, int) and text in self._by_name:
                out.add(self._by_name[text])
            elif _int_value(token) in self.all_class_names:
                out.add(_int_value(token))
            else:
                known = ", ".join(list(self._by_name)[:12]) + (", ..." if len(self._by_name) > 12 else "")
                raise DataError(f"class {token!r} of the {what} list is not in {self.classes_file} "
                                f"(by name or id; classes: {known})")
        return sorted(out)

    def _class_split(self, fold: int | str, folds: int, classes: dict[str, list[str | int]] | None,
                     val_classes: list[str | int] | None, val_fraction: float,
                     val_seed: int) -> tuple[list[int], list[int], list[int]]:
        """(train, val, test) class ids as the module docstring defines them."""
        every = sorted(self.all_class_names)
        classes = dict(classes or {})
        bad = [k for k in classes if k not in SPLITS]
        if bad:
            raise ValueError(f"class split has split {bad[0]!r}; splits are {', '.join(SPLITS)}")
        if classes and folds:
            raise ValueError("give explicit class lists or interleaved folds, not both")
        if classes.get("val") and val_classes:
            raise ValueError("validation classes given twice (classes['val'] and val_classes)")
        explicit_val = classes.get("val") or val_classes
        if explicit_val and val_fraction > 0:
            raise ValueError("give explicit validation classes or val_fraction_classes, not both")
        all_mode = not classes and fold in ("all", -1)
        named = {s: self._resolve(v, s) for s, v in classes.items() if v}
        val = self._resolve(explicit_val, "val") if explicit_val else []
        if classes:
            lists = {"train": named.get("train", []), "val": val, "test": named.get("test", [])}
            for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
                self._disjoint(lists[a], lists[b], a, b)
            test = lists["test"]
            train = lists["train"] or [c for c in every if c not in set(test) | set(val)]
        elif all_mode:
            train, test = list(every), list(every)
        elif folds:
            if folds < 2:
                raise ValueError(f"folds={folds} must be >= 2 (or 0 for none)")
            if _int_value(fold) is None or not 0 <= int(fold) < folds:
                raise ValueError(f"fold={fold!r} must be 0-{folds - 1}, -1 or 'all' with {folds} folds")
            test = [c for p, c in enumerate(every) if p % folds == int(fold)]
            train = [c for c in every if c not in test]
            if not test:
                raise DataError(f"{self.classes_file}: fold {fold} of {folds} has no class ({len(every)} classes)")
        else:
            raise ValueError("the semantic benchmark needs a class split: folds=k with fold=i, explicit classes "
                             "{train: [...], test: [...]}, or fold='all' (data.semantic_folds / data.fold, "
                             "data.semantic_classes)")
        if val and not classes:
            if not all_mode:
                self._disjoint(val, test, "val", "test")
            train = [c for c in train if c not in val]
        elif val_fraction > 0:
            train, val = self._carve(train, val_fraction, val_seed)
        if not train:
            raise DataError(f"{self.classes_file}: no training class is left under this class split")
        return train, val, test

    def _disjoint(self, a: list[int], b: list[int], name_a: str, name_b: str) -> None:
        both = sorted(set(a) & set(b))
        if both:
            c = both[0]
            raise DataError(f"class {self.all_class_names[c]!r} (id {c}) is in both the {name_a} and {name_b} class "
                            f"lists; a class may belong to one split only")

    def _carve(self, train: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Move the ``fraction`` of ``train`` ranked first by the seeded hash of the class name to validation."""
        n_val = max(1, round(fraction * len(train)))
        if n_val >= len(train):
            raise DataError(f"{self.classes_file}: val_fraction_classes={fraction} of {len(train)} training classes "
                            f"leaves none for training")

        def rank(c: int) -> bytes:
            return hashlib.sha1(f"{seed}:{self.all_class_names[c]}".encode()).digest()

        val = set(sorted(train, key=rank)[:n_val])
        return [c for c in train if c not in val], sorted(val)

    def _check_index(self, pairs: dict[str, tuple[Path, Path]]) -> None:
        """Sizes must match; unlisted non-zero values (background by the layout's rule) are warned about."""
        unlisted: dict[int, str] = {}
        for i, row in self.index.items():
            if row["label_hw"] != row["image_hw"]:
                (ih, iw), (lh, lw) = row["image_hw"], row["label_hw"]
                raise DataError(f"{pairs[i][0]}: image is {iw}x{ih} but its label {pairs[i][1]} is {lw}x{lh}")
            for v in map(int, row["counts"]):
                if v and v not in self.all_class_names and v not in self.ignore_values:
                    unlisted.setdefault(v, pairs[i][1].name)
        if unlisted:
            values = ", ".join(f"{v} (e.g. {name})" for v, name in sorted(unlisted.items()))
            warnings.warn(f"{self.root / 'labels'}: label values {values} are not in {self.classes_file} and count "
                          f"as background", stacklevel=3)

    # ----------------------------------------------------------------------------------------------

    def image_keys(self) -> list[str]:
        """Images with at least one indexed class of the split, in split order (classes.json list, else by id)."""
        return list(self._kept)

    def query_classes(self, key: str) -> list[int]:
        """The split's classes indexed for ``key`` (present with >= ``min_pixels`` pixels); no smaller ones."""
        return list(self._kept.get(key, []))

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 and mask ``[H, W]`` uint8 (class -> 1, ignore values -> 255, else 0)."""
        label = read_label(sample.mask_path)
        image = read_rgb(sample.image_path)
        check_same_size(image, label, sample.image_path, sample.mask_path)
        extra = [v for v in self.ignore_values if v != IGNORE_INDEX]
        if extra:
            label = np.where(np.isin(label, extra), np.uint8(IGNORE_INDEX), label)
        return image, binary_mask(label, class_id)

    def load_full(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Image and the label PNG as int32 class ids (255 and the ``ignore`` values -> -1)."""
        label = read_label(sample.mask_path)
        image = read_rgb(sample.image_path)
        check_same_size(image, label, sample.image_path, sample.mask_path)
        return image, np.where(np.isin(label, list(self.ignore_values)), -1, label.astype(np.int32))
