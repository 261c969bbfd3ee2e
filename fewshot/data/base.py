"""The contract every few-shot benchmark implements, and the episode it produces.

A benchmark is an index, not a loader of batches: it knows which (image, mask) pairs exist for each class
of a split and how to read one pair as a binary mask for a chosen class. Episodes (query + k supports +
class) are drawn from that index by :mod:`fewshot.data.episodes` from a seed alone, so the list is the
same whatever the number of workers or processes; transforms and batching come after.
"""

from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import DataError
from common.images import exif_orientation

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    """One annotated image of a benchmark: paths are absolute; ``key`` is unique within the benchmark."""

    key: str
    image_path: str
    mask_path: str  # for COCO the annotation JSON; the loader knows how to read it


@dataclass(frozen=True)
class EpisodeSpec:
    """A few-shot episode by reference: the query, its k supports (never the query) and the class."""

    query: str  # Sample.key
    supports: tuple[str, ...]
    class_id: int


class FewShotBenchmark(abc.ABC):
    """Index of one split of one benchmark; subclasses fill ``samples_by_class`` in ``__init__``.

    Attributes:
        name: benchmark name, e.g. ``"pascal5i"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        class_ids: the classes episodes may be drawn from in this split (e.g. the 5 test classes of a fold).
        class_names: ``class_id -> human name``.
        samples_by_class: ``class_id -> samples that contain that class`` (after any size filter).
    """

    name: str
    split: str
    class_ids: list[int]
    class_names: dict[int, str]
    samples_by_class: dict[int, list[Sample]]

    @abc.abstractmethod
    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one sample for one class.

        Returns:
            image: uint8 RGB array ``[H, W, 3]``.
            mask: uint8 array ``[H, W]`` with 1 = ``class_id``, 0 = anything else, 255 = ignore.

        Raises:
            DataError: the file is missing, unreadable, truncated, or image and mask sizes differ.
        """

    def sample(self, key: str) -> Sample:
        """Look a sample up by key (built lazily from ``samples_by_class``)."""
        if not hasattr(self, "_by_key"):
            self._by_key = {s.key: s for samples in self.samples_by_class.values() for s in samples}
        return self._by_key[key]

    def image_keys(self) -> list[str]:
        """Every indexed image once, in the benchmark's list order (default: class by class, file order)."""
        return list(dict.fromkeys(s.key for c in self.class_ids for s in self.samples_by_class.get(c, [])))

    def query_classes(self, key: str) -> list[int]:
        """The split's classes an episode may ask about when ``key`` is the query (default: the classes it is
        indexed under; PASCAL and COCO also allow classes below the size filter, as PFENet does)."""
        if not hasattr(self, "_classes_by_key"):
            self._classes_by_key: dict[str, list[int]] = {}
            for c in self.class_ids:
                for s in self.samples_by_class.get(c, []):
                    self._classes_by_key.setdefault(s.key, []).append(c)
        return self._classes_by_key.get(key, [])

    def num_pairs(self) -> int:
        """Number of indexed (image, class) pairs."""
        return sum(len(self.samples_by_class.get(c, [])) for c in self.class_ids)

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}:{len(self.samples_by_class.get(c, []))}" for c in self.class_ids)
        return f"{type(self).__name__}(split={self.split!r}, classes={len(self.class_ids)} [{counts}])"


# --------------------------------------------------------------------------------------------------
# reading files: every failure becomes a DataError that names the file (images: common.images.read_rgb)


def read_label(path: str | Path, grey: bool = False) -> np.ndarray:
    """A label PNG as uint8 ``[H, W]``: palette / L indices as stored, or (``grey``) converted to grey levels."""
    try:
        with Image.open(path) as im:
            if grey:
                im = im.convert("L")
            elif im.mode not in ("P", "L"):
                raise DataError(f"{path}: label PNG has mode {im.mode}, expected a palette (P) or grey (L) image "
                                f"of class indices")
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as err:
        raise DataError(f"{path}: label file is missing") from err
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: label file is too large to decode safely ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: label file is unreadable or truncated ({err})") from err


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: str, mask_path: str) -> None:
    """Raise DataError when an image and its mask differ in size."""
    if image.shape[:2] != mask.shape[:2]:
        orientation = exif_orientation(image_path)
        exif = (f"; the image carries EXIF orientation {orientation}: it is used as stored, so the mask must be "
                f"drawn on the stored (unrotated) pixels" if orientation > 1 else "")
        raise DataError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
                        f"{mask.shape[1]}x{mask.shape[0]}{exif}")


def binary_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """Class-index label -> episode mask: ``class_id`` -> 1, 255 -> 255, everything else -> 0."""
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    """Deterministic membership of the held-out 'val' share: a hash of (seed, key), independent of list order."""
    if fraction <= 0:
        return False
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def index_cache_dir(cache_dir: str | Path = "") -> Path:
    """Folder for cached indices: ``cache_dir`` when given, else ``$XDG_CACHE_HOME/qgnet-fss``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qgnet-fss"
