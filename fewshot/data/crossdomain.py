"""Cross-domain few-shot benchmarks (CD-FSS, the PATNet protocol): ISIC-2018, Chest X-ray, Deepglobe, Kvasir-SEG.

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
"""

from __future__ import annotations

import csv
from pathlib import Path

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
