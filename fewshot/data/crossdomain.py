"""Cross-domain few-shot benchmarks (CD-FSS, the PATNet protocol): ISIC-2018, Chest X-ray, Deepglobe, Kvasir-SEG,
and the targets of CD-TG (WBC, CHAOS-MRI) and MMT (SUIM).

Models trained on PASCAL are tested on these target domains directly: 600 episodes per dataset, images
squashed to 400x400 (``eval.episodes: 600``, ``data.eval_size: 401`` in ``configs/finetune/cdfss_*.yaml``), query
and supports drawn from the same
class pool, masks binarised at 128 (value > 127 -> 1, else 0; there is no ignore label). Every benchmark is
a ``split="test"`` index; class ids are the class folder names PATNet uses (1-based).

Expected trees (each class takes the dataset folder itself as ``root``; ``DEFAULT_SUBDIR`` is its name
under ``$FSS_DATA``)::

    ISIC/                                        Isic2018, 2,594 images, 3 classes (1 nevus,
    ├── ISIC2018_Task1-2_Training_Input/           2 seborrheic keratosis, 3 melanoma)
    │   └── <1|2|3>/ISIC_<id>.jpg                built by `python -m fewshot.tools.prepare_isic`
    └── ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png
      or, flat:  images/ISIC_<id>.jpg + masks/ISIC_<id>_segmentation.png (+ class_id.csv, default: the
                 one shipped in fewshot/data/splits/isic/, PATNet's)

    LungSegmentation/                            ChestXray, 1 class (lungs)
    ├── CXR_png/<id>.png                         grayscale X-rays (returned as RGB)
    └── masks/<id>_mask.png                      the samples are the ``*_mask.png`` files (566 Shenzhen masks
                                                 in the Kaggle release); Montgomery masks there are named
                                                 ``MCUCXR_*.png`` without ``_mask``: PATNet cannot read them
                                                 and they are excluded (counted in ``excluded``)

    Deepglobe/                                   Deepglobe, 6 land-cover classes (1 agriculture, 2 urban,
    └── <1..6>/test/                               3 rangeland, 4 forest, 5 water, 6 barren)
        ├── origin/<tile>.jpg                    408x408 tiles (python -m fewshot.tools.prepare_deepglobe)
        └── groundtruth/<tile>.png               the tile's binary mask for that class folder's class
                                                 (IFA-style ``*_sat_<ij>.jpg`` / ``*_mask_<ij>.png`` names work too)

    Kvasir-SEG/                                  KvasirSeg, 1 class (polyp), 1,000 images
    ├── images/<id>.jpg
    └── masks/<id>.png  (or <id>.jpg, as in the official release)

    segmentation_WBC/                            Wbc, 1 class (white blood cell), 400 images: the public
    ├── Dataset 1/<NNN>.bmp + <NNN>.png            release (github zxaoyou/segmentation_WBC) as cloned;
    └── Dataset 2/<NNN>.bmp + <NNN>.png            Dataset 1: 300 images 120x120, Dataset 2: 100 images
                                                 300x300; masks 0 background, 128 cytoplasm, 255 nucleus
                                                 (binarised at 128: the whole cell, as CD-TG's loader)

    CHAOS-MRI/                                   ChaosMri, 4 classes (1 liver, 2 right kidney, 3 left kidney,
    ├── images/<patient>_<seq>_<slice>.png         4 spleen): MRI slices written by `python -m
    ├── labels/<patient>_<seq>_<slice>.png         fewshot.tools.prepare_chaos` from the CHAOS training release
    └── index.csv                                  (20 MR patients; T2SPIR by default); labels are class indices

    SUIM/                                        Suim, 8 classes by the release's RGB code (R,G,B bits, each
    ├── train_val/images/<id>.jpg + masks/<id>.bmp channel thresholded at 128): 1 background waterbody (000),
    └── TEST/images/<id>.jpg + masks/<id>.bmp      2 human divers (001), 3 aquatic plants (010), 4 wrecks (011),
                                                 5 robots (100), 6 reefs (101), 7 fish (110), 8 sea floor
                                                 (111); 1,525 train_val + 110 TEST images, both indexed
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

from common.images import read_rgb
from fewshot.data.base import DataError, FewShotBenchmark, Sample, check_same_size, read_label
from fewshot.data.fss import MASK_THRESHOLD, binarise_mask

ISIC_CLASS_CSV = Path(__file__).resolve().parent / "splits" / "isic" / "class_id.csv"
ISIC_CLASS_IDS = {"nevus": 1, "seborrheic_keratosis": 2, "melanoma": 3}
ISIC_TRAIN_IMAGES = 2594  # ISIC-2018 task 1 training set = the rows of PATNet's class_id.csv
DEEPGLOBE_CLASS_NAMES = {1: "agriculture", 2: "urban", 3: "rangeland", 4: "forest", 5: "water", 6: "barren"}


def read_binary_mask(path: str | Path, check: bool = True) -> np.ndarray:
    """Decode a mask as uint8 ``[H, W]``: 1 where its gray value is >= 128, else 0 (PATNet's rule).

    Colour masks are reduced to luminance first, as PATNet does, so white -> 1 and black -> 0.

    Raises:
        DataError: with ``check``, a mask left empty by the threshold although it has values 1..127 (saved as
            0/1 class indices; see :func:`fewshot.data.fss.binarise_mask`).
    """
    grey = read_label(path, grey=True)
    if check:
        return binarise_mask(grey, path, layout="cross-domain (PATNet)")
    return (grey >= MASK_THRESHOLD).astype(np.uint8)


def read_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Image ``[H, W, 3]`` uint8 RGB (grayscale converted) and binary mask ``[H, W]`` uint8 of a sample.

    Raises:
        DataError: naming the file when it is missing, unreadable or truncated, or when the sizes differ.
    """
    image, mask = read_rgb(sample.image_path), read_binary_mask(sample.mask_path)
    check_same_size(image, mask, sample.image_path, sample.mask_path)
    return image, mask


def read_isic_class_csv(path: str | Path) -> dict[str, int]:
    """``ISIC_<id> -> class id`` (1 nevus, 2 seborrheic keratosis, 3 melanoma) from a PATNet class_id.csv.

    Raises:
        DataError: the file is missing, has no ``ID,Class`` header, an unknown class name or a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ISIC class csv not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0]] != ["ID", "Class"]:
        raise DataError(f"{path}: expected the header 'ID,Class', got {rows[0] if rows else 'an empty file'}")
    classes: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or row[1].strip() not in ISIC_CLASS_IDS:
            raise DataError(f"{path}:{line}: expected '<id>,<{'|'.join(ISIC_CLASS_IDS)}>', got {','.join(row)!r}")
        image_id = row[0].strip()
        if image_id in classes:
            raise DataError(f"{path}:{line}: {image_id} is listed twice")
        classes[image_id] = ISIC_CLASS_IDS[row[1].strip()]
    return classes


class CrossDomainBenchmark(FewShotBenchmark):
    """Shared behaviour: one binary mask file per (sample, class), binarised at 128, test split only.

    Attributes (besides :class:`FewShotBenchmark`'s):
        root: the dataset folder.
        excluded: ``reason -> count`` of files found but deliberately not indexed (reported, never silent).
    """

    DEFAULT_SUBDIR: str

    def __init__(self, root: str | Path, samples_by_class: dict[int, list[Sample]], class_names: dict[int, str],
                 excluded: dict[str, int] | None = None) -> None:
        self.root = Path(root)
        self.split = "test"
        self.class_ids = sorted(class_names)
        self.class_names = class_names
        for class_id in self.class_ids:
            if not samples_by_class.get(class_id):
                raise DataError(f"{self.root}: no samples for class {class_id} ({class_names[class_id]}); "
                                f"see the expected tree in {__name__}")
        self.samples_by_class = samples_by_class
        self.excluded = {reason: n for reason, n in (excluded or {}).items() if n}

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 RGB and mask ``[H, W]`` uint8 in {0, 1} (1 = ``class_id``)."""
        if class_id not in self.query_classes(sample.key):
            raise ValueError(f"{self.name}: sample {sample.key} is not annotated for class {class_id}")
        return read_pair(sample)

    def class_pair(self, sample: Sample, class_id: int,
                   read_classes: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Image and ``read_classes(mask_path) == class_id`` for benchmarks whose masks hold several classes."""
        if class_id not in self.query_classes(sample.key):
            raise ValueError(f"{self.name}: sample {sample.key} is not annotated for class {class_id}")
        image, classes = read_rgb(sample.image_path), read_classes(sample.mask_path)
        check_same_size(image, classes, sample.image_path, sample.mask_path)
        return image, (classes == class_id).astype(np.uint8)

    def foreground_pixels(self, sample: Sample) -> int:
        """Number of foreground pixels of the sample's mask (reads the mask only)."""
        return int(read_binary_mask(sample.mask_path, check=False).sum())

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}:{len(self.samples_by_class[c])}" for c in self.class_ids)
        skipped = "".join(f", excluded {n} ({reason})" for reason, n in self.excluded.items())
        return f"{type(self).__name__}({str(self.root)!r}, classes={len(self.class_ids)} [{counts}]{skipped})"


def _pair_or_fail(image: Path, mask_candidates: list[Path]) -> Path:
    for mask in mask_candidates:
        if mask.is_file():
            return mask
    raise DataError(f"{mask_candidates[0]}: mask not found for image {image}")


def _sorted_files(folder: Path, pattern: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.glob(pattern) if p.is_file())


class Isic2018(CrossDomainBenchmark):
    """ISIC-2018 task 1 lesions, 3 classes by diagnosis: PATNet's class folders or a flat layout + class csv.

    Args:
        root: the ``ISIC`` folder (either layout, see the module docstring).
        class_csv: flat layout only; default ``root/class_id.csv`` when present, else the shipped PATNet csv.
        skip_unlisted: flat layout only; images whose id the csv lacks are counted in ``excluded`` instead of
            raising :class:`DataError`.
    """

    name = "isic"
    DEFAULT_SUBDIR = "ISIC"
    IMAGES = "ISIC2018_Task1-2_Training_Input"
    MASKS = "ISIC2018_Task1_Training_GroundTruth"

    def __init__(self, root: str | Path, class_csv: str | Path | None = None, skip_unlisted: bool = False) -> None:
        root = Path(root)
        class_names = {c: n.replace("_", " ") for n, c in ISIC_CLASS_IDS.items()}
        samples: dict[int, list[Sample]] = {c: [] for c in class_names}
        excluded = {}
        if (root / self.IMAGES).is_dir():
            seen: dict[str, Path] = {}
            for class_id in class_names:
                for image in _sorted_files(root / self.IMAGES / str(class_id), "*.jpg"):
                    if image.stem in seen:
                        raise DataError(f"{image}: {image.stem} is also in {seen[image.stem]}; "
                                        "an image has one class")
                    seen[image.stem] = image
                    mask = _pair_or_fail(image, [root / self.MASKS / f"{image.stem}_segmentation.png"])
                    samples[class_id].append(Sample(image.stem, str(image), str(mask)))
        elif (root / "images").is_dir():
            csv_path = Path(class_csv) if class_csv else (root / "class_id.csv" if (root / "class_id.csv").is_file()
                                                          else ISIC_CLASS_CSV)
            classes = read_isic_class_csv(csv_path)
            unlisted = 0
            for image in _sorted_files(root / "images", "*.jpg"):
                if image.stem not in classes:
                    if not skip_unlisted:
                        raise DataError(f"{image}: {image.stem} is not in the class csv {csv_path} "
                                        "(pass skip_unlisted=True to count and skip such images)")
                    unlisted += 1
                    continue
                mask = _pair_or_fail(image, [root / "masks" / f"{image.stem}_segmentation.png"])
                samples[classes[image.stem]].append(Sample(image.stem, str(image), str(mask)))
            excluded["not in the class csv"] = unlisted
        else:
            raise DataError(f"{root}: neither {self.IMAGES}/<1|2|3>/ (run fewshot.tools.prepare_isic) "
                            "nor a flat images/ + masks/ layout was found")
        super().__init__(root, samples, class_names, excluded)


class ChestXray(CrossDomainBenchmark):
    """Chest X-ray lungs (Shenzhen set of the Kaggle "Lung Segmentation" release), 1 class; indexed by mask."""

    name = "chest_xray"
    DEFAULT_SUBDIR = "LungSegmentation"

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        samples = []
        for mask in _sorted_files(root / "masks", "*_mask.png"):
            key = mask.name[: -len("_mask.png")]
            image = root / "CXR_png" / f"{key}.png"
            if not image.is_file():
                raise DataError(f"{image}: image not found for mask {mask}")
            samples.append(Sample(key, str(image), str(mask)))
        other_masks = sum(1 for p in (root / "masks").glob("*.png") if not p.name.endswith("_mask.png"))
        without_mask = len(list((root / "CXR_png").glob("*.png"))) - len(samples)
        super().__init__(root, {1: samples}, {1: "lungs"},
                         {"masks not named <id>_mask.png (Montgomery set)": other_masks,
                          "images without a mask": without_mask})


class Deepglobe(CrossDomainBenchmark):
    """Deepglobe land cover after PATNet's tiling (6 classes); a tile appears once per class it contains.

    Sample keys are ``"<class>/<tile>"``: the same tile has a different binary mask in each class folder.
    """

    name = "deepglobe"
    DEFAULT_SUBDIR = "Deepglobe"

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        samples: dict[int, list[Sample]] = {}
        for class_id in DEEPGLOBE_CLASS_NAMES:
            folder = root / str(class_id) / "test"
            samples[class_id] = []
            for image in _sorted_files(folder / "origin", "*.jpg"):
                candidates = [folder / "groundtruth" / f"{image.stem}.png"]
                if "_sat_" in image.stem:  # IFA's preprocess keeps DeepGlobe's own _sat/_mask names
                    candidates.append(folder / "groundtruth" / f"{image.stem.replace('_sat_', '_mask_')}.png")
                mask = _pair_or_fail(image, candidates)
                samples[class_id].append(Sample(f"{class_id}/{image.stem}", str(image), str(mask)))
        super().__init__(root, samples, dict(DEEPGLOBE_CLASS_NAMES))


class KvasirSeg(CrossDomainBenchmark):
    """Kvasir-SEG colonoscopy polyps, 1 class; masks as PNG or as the official release's JPEG."""

    name = "kvasir"
    DEFAULT_SUBDIR = "Kvasir-SEG"

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        samples = []
        for image in _sorted_files(root / "images", "*.jpg"):
            mask = _pair_or_fail(image, [root / "masks" / f"{image.stem}.png", root / "masks" / f"{image.stem}.jpg"])
            samples.append(Sample(image.stem, str(image), str(mask)))
        super().__init__(root, {1: samples}, {1: "polyp"})


CROSS_DOMAIN: dict[str, type[CrossDomainBenchmark]] = {
    "isic": Isic2018,
    "chest_xray": ChestXray,
    "deepglobe": Deepglobe,
    "kvasir": KvasirSeg,
}


class Wbc(CrossDomainBenchmark):
    """White blood cells (segmentation_WBC release, CD-TG's WBC target), 1 class; keys ``"Dataset 1/001"``.

    Args:
        root: the ``segmentation_WBC`` folder (the cloned repository).
        datasets: the sub-sets indexed (default both; Dataset 1 = 300 images, Dataset 2 = 100).
    """

    name = "wbc"
    DEFAULT_SUBDIR = "segmentation_WBC"
    CLASS_NAMES = {1: "white blood cell"}
    DATASETS = ("Dataset 1", "Dataset 2")
    EXPECTED = {"Dataset 1": 300, "Dataset 2": 100}

    def __init__(self, root: str | Path, datasets: tuple[str, ...] = DATASETS) -> None:
        root = Path(root)
        samples = []
        for sub in datasets:
            images = [p for p in _sorted_files(root / sub, "*") if p.suffix.lower() in (".bmp", ".jpg", ".tif")]
            for image in images:
                mask = _pair_or_fail(image, [image.with_suffix(".png")])
                samples.append(Sample(f"{sub}/{image.stem}", str(image), str(mask)))
        super().__init__(root, {1: samples}, dict(self.CLASS_NAMES))


CHAOS_CLASS_NAMES = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}


class ChaosMri(CrossDomainBenchmark):
    """CHAOS abdominal MRI slices (CD-TG's CHAOS-MRI target) after ``fewshot.tools.prepare_chaos``, 4 organs.

    A slice is a sample of every organ its label map shows (``index.csv``: ``key,classes`` with the class ids
    separated by spaces); the episode mask is that organ (1) against everything else (0).
    """

    name = "chaos_mri"
    DEFAULT_SUBDIR = "CHAOS-MRI"
    CLASS_NAMES = CHAOS_CLASS_NAMES

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        index = root / "index.csv"
        if not index.is_file():
            raise DataError(f"{index}: not found; write the slices with `python -m fewshot.tools.prepare_chaos "
                            f"CHAOS_Train_Sets/Train_Sets/MR --out {root}`")
        samples: dict[int, list[Sample]] = {c: [] for c in CHAOS_CLASS_NAMES}
        with index.open(newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                try:
                    classes = [int(c) for c in row["classes"].split()]
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{index}:{line}: expected 'key,classes' with class ids, got {row}") from None
                if any(c not in samples for c in classes):
                    raise DataError(f"{index}:{line}: class ids must be in 1..4, got {row['classes']!r}")
                image, label = root / "images" / f"{row['key']}.png", root / "labels" / f"{row['key']}.png"
                for c in classes:
                    samples[c].append(Sample(row["key"], str(image), str(label)))
        super().__init__(root, samples, dict(CHAOS_CLASS_NAMES))

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 RGB (the grey slice) and mask ``[H, W]`` in {0, 1} (1 = the organ)."""
        return self.class_pair(sample, class_id, read_label)

    def foreground_pixels(self, sample: Sample) -> int:
        """Pixels of any organ in the slice's label map."""
        return int((read_label(sample.mask_path) > 0).sum())


SUIM_CLASS_NAMES = {1: "background waterbody", 2: "human divers", 3: "aquatic plants", 4: "wrecks", 5: "robots",
                    6: "reefs", 7: "fish", 8: "sea floor"}


def suim_codes(path: str | Path) -> np.ndarray:
    """A SUIM colour mask -> class ids ``[H, W]`` in 1..8: ``1 + 4 R + 2 G + B`` with each channel >= 128."""
    rgb = read_rgb(path) >= 128
    return (1 + 4 * rgb[..., 0] + 2 * rgb[..., 1] + rgb[..., 2]).astype(np.uint8)


class Suim(CrossDomainBenchmark):
    """SUIM underwater imagery (MMT's target), 8 colour-coded classes; keys ``"<folder>/<id>"``.

    Indexing reads every mask once (the classes present, at least ``min_pixels`` pixels each).

    Args:
        root: the ``SUIM`` folder.
        folders: the release's folders indexed (default ``train_val`` and ``TEST``).
        min_pixels: the smallest area that makes an image a sample of a class.
    """

    name = "suim"
    DEFAULT_SUBDIR = "SUIM"
    CLASS_NAMES = SUIM_CLASS_NAMES
    FOLDERS = ("train_val", "TEST")

    def __init__(self, root: str | Path, folders: tuple[str, ...] = FOLDERS, min_pixels: int = 1) -> None:
        root = Path(root)
        samples: dict[int, list[Sample]] = {c: [] for c in SUIM_CLASS_NAMES}
        found = [f for f in folders if (root / f / "images").is_dir()]
        if not found:
            raise DataError(f"{root}: none of {', '.join(f + '/images' for f in folders)} was found")
        for folder in found:
            for image in _sorted_files(root / folder / "images", "*.jpg"):
                mask = _pair_or_fail(image, [root / folder / "masks" / f"{image.stem}.bmp",
                                             root / folder / "masks" / f"{image.stem}.png"])
                counts = np.bincount(suim_codes(mask).ravel(), minlength=9)
                for c in SUIM_CLASS_NAMES:
                    if counts[c] >= max(min_pixels, 1):
                        samples[c].append(Sample(f"{folder}/{image.stem}", str(image), str(mask)))
        super().__init__(root, samples, dict(SUIM_CLASS_NAMES))

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 RGB and mask ``[H, W]`` in {0, 1} (1 = pixels of ``class_id``'s colour)."""
        return self.class_pair(sample, class_id, suim_codes)

    def foreground_pixels(self, sample: Sample) -> int:
        """Pixels that are not background waterbody."""
        return int((suim_codes(sample.mask_path) != 1).sum())


# the CD-TG and MMT targets beyond PATNet's four (CROSS_DOMAIN); the registry names both sets
MORE_TARGETS: dict[str, type[CrossDomainBenchmark]] = {"wbc": Wbc, "chaos_mri": ChaosMri, "suim": Suim}
