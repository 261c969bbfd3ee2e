"""The contract every few-shot benchmark implements, and the episode it produces.

A benchmark is an index, not a loader of batches: it knows which (image, mask) pairs exist for each class
of a split and how to read one pair as a binary mask for a chosen class. Episodes (query + k supports +
class) are drawn from that index by :mod:`finetune.data.episodes` from a seed alone, so the list is the
same whatever the number of workers or processes; transforms and batching come after.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

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

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}:{len(self.samples_by_class.get(c, []))}" for c in self.class_ids)
        return f"{type(self).__name__}(split={self.split!r}, classes={len(self.class_ids)} [{counts}])"


class DataError(RuntimeError):
    """Bad input data; the message always names the offending file and what is wrong with it."""
