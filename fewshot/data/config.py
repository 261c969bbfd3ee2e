"""Config keys of the stage-2 data (``data.*``): which benchmark, where it lives, how it is indexed and augmented.

Shot, evaluation protocol, episode counts and evaluation seeds live in the top-level stage-2 schema
(``shot``, ``eval.*``); this section only says what the data is and how one sample becomes a tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from common.config import field


def default_root() -> str:
    """``$FSS_DATA`` when set, else ``./datasets`` (the HSNet / detectron2 convention)."""
    return os.environ.get("FSS_DATA", "./datasets")


@dataclass
class DataConfig:
    benchmark: str = field(
        "synthetic", help="pascal5i | coco20i | fss1000 | synthetic (a generated FSS-1000-layout set, the default "
                          "when no data is given) | semantic (a generic images/ + labels/ + classes.json folder at "
                          "data.root, see fewshot.data.semantic) | the cross-domain sets registered in "
                          "fewshot.data.registry")
    root: str = field(default_root(), help="dataset root (default: $FSS_DATA, else ./datasets); the benchmark's "
                                           "folder inside it (VOC2012/, COCO2014/, FSS-1000/) is found automatically")
    fold: int | str = field(0, help="PASCAL-5i / COCO-20i fold 0-3 (its classes are the test classes); "
                                    "'all' or -1 = every class (cross-domain source training)")
    min_pixels: int = field(2048, help="an (image, class) pair is kept only if the class covers at least this many "
                                       "pixels at original resolution (OSLSM / PFENet: 2*32*32); FSS-1000 uses none")
    val_fraction: float = field(
        0.1, help="share of the training list held out (deterministically, by a hash of the image id and "
                  "data.val_seed) as split 'val': episodes of the *training* classes for model selection; "
                  "those images leave split 'train'. 0 = the reference list untouched and no 'val' split")
    val_seed: int = field(0, help="seed of the held-out 'val' selection")
    coco_year: Literal["auto", "2014", "2017"] = field("auto", help="COCO annotation year (auto: 2014 if present)")
    fss_classes: dict[str, list[str]] = field(
        {}, help="FSS layout: split -> class folders, e.g. {train: [a, b], test: [c]}; a split not listed uses "
                 "its shipped split file (FSS-1000's official test.txt) or, for 'all', every folder")
    index_only: bool = field(False, help="index masks only (no images needed): counts and checks, no loading")
    cache_dir: str = field("", help="where filtered indices are cached (default: $XDG_CACHE_HOME/qgnet-fss)")
    train_size: int = field(473, help="training crop S (8n+1)")
    train_long_side: int = field(
        0, help="0 = augment images at their own resolution (reference); >0 = first resize so the long side is "
                "this many pixels. Set it to about eval_size when the crop is much smaller than the images, or "
                "training sees objects zoomed in relative to the resized evaluation images")
    eval_size: int = field(473, help="evaluation canvas S (8n+1; pfenet: long side resized to S then floored to "
                                     "a multiple of 8, hsnet: square resize)")
    scale: tuple[float, float] = field((0.9, 1.1), help="RandScale range (COCO reference: 0.8-1.25)")
    rotate: tuple[float, float] = field((-10.0, 10.0), help="RandRotate angle range in degrees (applied with p 0.5)")
    num_workers: int = field(2, help="training loader workers (episodes and augmentation do not depend on it)")
    augment_on: Literal["auto", "worker", "device"] = field(
        "auto", help="training augmentation: worker = loader workers resize, rotate, blur, flip, crop and normalise "
                     "each image; device = workers draw the same random choices and make the masks (identical), "
                     "the images are warped, blurred and normalised batched on the accelerator "
                     "(fewshot/data/device_augment.py; each batch carries the full-size uint8 images); auto = "
                     "device on CUDA, worker elsewhere. Episode training only (fscs and base stages: worker); "
                     "evaluation always resizes in the workers")
    on_bad_sample: Literal["error", "skip"] = field(
        "error", help="error: a bad file stops the run naming it; skip: the episode is dropped, counted, reported")
    query_order: Literal["cycle", "random"] = field(
        "cycle", help="evaluation queries: cycle = walk the image list in order, class drawn among the image's "
                      "classes (PFENet; FSS-1000 with n=all gives every image once), random = class-uniform (HSNet)")
    synthetic_classes: int = field(12, help="synthetic set: number of classes (split 8:2:2 into train/val/test "
                                            "when 12; proportionally otherwise)")
    synthetic_per_class: int = field(10, help="synthetic set: images per class")
    synthetic_size: int = field(160, help="synthetic set: image side in pixels")
    synthetic_seed: int = field(0, help="synthetic set: generation seed (the set is a pure function of it)")
    semantic_folds: int = field(
        0, help="semantic layout: k interleaved class folds; data.fold=i tests the classes at positions p % k == i "
                "of the sorted class ids and trains on the rest. 0 = no folds: use data.semantic_classes, or "
                "data.fold=all (every class in every split)")
    semantic_classes: dict[str, list[str]] = field(
        {}, help="semantic layout: explicit class split by name or id, e.g. {train: [car, road], val: [sky], "
                 "test: [pedestrian]}; a missing train list = every class not in val / test. Excludes "
                 "data.semantic_folds")
    val_classes: list[str] = field(
        [], help="validation classes by name: taken out of the training classes of every source and never used "
                 "by a training episode; model selection scores them (class-disjoint from training and test)")
    val_class_fraction: float = field(
        0.0, help="instead of data.val_classes: this share of all training class names (at least one), chosen by "
                  "a hash of the name and data.val_seed. 0 and no data.val_classes = each benchmark's own 'val' "
                  "split (PASCAL / COCO: held-out images of the training classes, data.val_fraction)")
    sources: list[dict[str, Any]] = field(
        [], help="train on several datasets at once: a list of data.* overrides, each with a unique 'name', an "
                 "optional 'weight' (episodes drawn per source by weight; 0 = in proportion to its (image, class) "
                 "pairs) and 'test: false' for a training-only source. Test results are reported per source")

    def validate(self) -> None:
        """Reject values that cannot work (ValueError naming the key)."""
        for key in ("train_size", "eval_size"):
            size = getattr(self, key)
            if size < 9 or (size - 1) % 8:
                raise ValueError(f"data.{key}={size} must be 8n+1 (e.g. 473, 401, 97)")
        if self.benchmark == "semantic" and self.semantic_folds:
            if self.fold not in (-1, "all") and self.fold not in range(self.semantic_folds):
                raise ValueError(f"data.fold={self.fold!r} must be 0-{self.semantic_folds - 1}, -1 or 'all' with "
                                 f"data.semantic_folds={self.semantic_folds}")
        elif self.fold not in (0, 1, 2, 3, -1, "all"):
            raise ValueError(f"data.fold={self.fold!r} must be 0-3, -1 or 'all'")
        self._validate_semantic()
        self._validate_sources()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"data.scale={self.scale} must be an increasing pair of positive factors")
        if self.rotate[0] > self.rotate[1]:
            raise ValueError(f"data.rotate={self.rotate} must be an increasing pair")
        if self.train_long_side < 0:
            raise ValueError(f"data.train_long_side={self.train_long_side} must be >= 0 (0 = off)")
        if self.min_pixels < 0:
            raise ValueError(f"data.min_pixels={self.min_pixels} must be >= 0")
        if self.synthetic_classes < 3 or self.synthetic_per_class < 2:
            raise ValueError("data.synthetic_classes must be >= 3 and data.synthetic_per_class >= 2")

    def _validate_sources(self) -> None:
        """Each ``data.sources`` entry: a unique name and valid data.* keys (built here, so errors come now)."""
        if not self.sources:
            return
        from fewshot.data.sources import source_configs  # sources imports this module

        names = [entry.get("name") if isinstance(entry, dict) else None for entry in self.sources]
        for i, (entry, name) in enumerate(zip(self.sources, names)):
            if not name or not isinstance(name, str):
                raise ValueError(f"data.sources[{i}] needs a 'name' (used in keys, class names and result tables)")
            if names.count(name) > 1:
                raise ValueError(f"data.sources[{i}]: name {name!r} is used twice")
            if "sources" in entry:
                raise ValueError(f"data.sources[{i}] ({name}): sources do not nest")
            if float(entry.get("weight", 0.0)) < 0:
                raise ValueError(f"data.sources[{i}] ({name}): weight must be >= 0 (0 = by size)")
        source_configs(self)

    def _validate_semantic(self) -> None:
        """The semantic-layout keys: a well-formed, unambiguous class split (ValueError naming the key)."""
        if self.semantic_folds < 0 or self.semantic_folds == 1:
            raise ValueError(f"data.semantic_folds={self.semantic_folds} must be 0 (no folds) or >= 2")
        bad = [k for k in self.semantic_classes if k not in ("train", "val", "test")]
        if bad:
            raise ValueError(f"data.semantic_classes has split {bad[0]!r}; its splits are train, val, test")
        if self.semantic_classes and self.semantic_folds:
            raise ValueError("data.semantic_classes and data.semantic_folds are both set: give explicit class "
                             "lists or interleaved folds, not both")
        if not 0.0 <= self.val_class_fraction < 1.0:
            raise ValueError(f"data.val_class_fraction={self.val_class_fraction} must be in [0, 1)")
        if self.val_class_fraction > 0 and (self.val_classes or self.semantic_classes.get("val")):
            raise ValueError("data.val_class_fraction and explicit validation classes are both set: give one of them")
        if self.semantic_classes.get("val") and self.val_classes:
            raise ValueError("data.val_classes and data.semantic_classes.val are both set: give the validation "
                             "classes once")
        if (self.benchmark == "semantic" and not self.semantic_folds and not self.semantic_classes
                and self.fold not in (-1, "all")):
            raise ValueError(f"data.benchmark=semantic with data.fold={self.fold!r} needs a class split: "
                             f"data.semantic_folds=k (then data.fold=0..k-1), data.semantic_classes={{train: [...], "
                             f"test: [...]}}, or data.fold=all (every class in every split)")
