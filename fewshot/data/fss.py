"""FSS-1000 layout: ``<root>/<class>/<n>.jpg`` with ``<n>.png`` masks (binarised at 128).

Class splits follow HSNet (``splits/fss/{trn,val,test}.txt``, 520 / 240 / 240 classes); the shipped
``test.txt`` is the official FSS-1000 test set. A split file that is not shipped (HSNet's ``trn``/``val``) can
be given with ``split_file``. ``split='all'`` takes every class folder under the root, and ``classes`` an
explicit list, so small custom sets in this layout (e.g. the pet classes of ``fss-mini``) work too. Class
ids are 1..N over the split's classes sorted by name; there is no size filter (HSNet uses none).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from common.images import read_rgb
from fewshot.data.base import DataError, FewShotBenchmark, Sample, check_same_size, read_label

MASK_THRESHOLD = 128  # grey >= 128 is foreground
SPLIT_DIR = Path(__file__).resolve().parent / "splits" / "fss"
SPLIT_FILES = {"train": "trn.txt", "val": "val.txt", "test": "test.txt"}


def fss_folder(root: str | Path) -> Path:
    """``root/FSS-1000`` when it exists, else ``root``."""
    root = Path(root).expanduser()
    return root / "FSS-1000" if (root / "FSS-1000").is_dir() else root


def read_class_list(path: Path) -> list[str]:
    """Class folder names, one per line."""
    if not path.is_file():
        raise DataError(f"{path}: FSS class split file is missing (HSNet's data/splits/fss/{path.name}; place it "
                        f"there or pass split_file=/ data.fss_classes)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def binarise_mask(grey: np.ndarray, path: str | Path, layout: str = "FSS-layout") -> np.ndarray:
    """``grey >= 128`` -> 1, else 0, as uint8; a mask this leaves empty although it has values 1..127 is an error.

    Such a mask was almost surely saved with class indices (0/1) instead of 0/255: binarised at 128 it would
    have no foreground at all, and the episode would fail later with a message about the class, not the file.

    Raises:
        DataError: naming the file, the threshold and the mask's maximum value.
    """
    mask = (grey >= MASK_THRESHOLD).astype(np.uint8)
    if not mask.any():
        top = int(grey.max()) if grey.size else 0
        if top > 0:
            raise DataError(f"{path}: {layout} masks are binarised at {MASK_THRESHOLD} (grey >= {MASK_THRESHOLD} is "
                            f"foreground) but this mask's maximum is {top}, so it has no foreground; save masks as "
                            f"0 = background, 255 = foreground (a 0/1 mask times 255)")
    return mask


def numeric_key(path: Path) -> tuple[int, str]:
    """Sort ``2.jpg`` before ``10.jpg``."""
    match = re.match(r"\d+", path.stem)
    return (int(match.group()) if match else -1, path.stem)


class Fss1000(FewShotBenchmark):
    """The classes of one FSS-1000 split (or an explicit class list) and their images.

    Args:
        root: folder of class folders (or its parent holding ``FSS-1000/``).
        split: ``'train'``, ``'val'``, ``'test'`` (HSNet class splits) or ``'all'`` (every class folder).
        classes: explicit class folder names; overrides ``split``'s class list.
        split_file: a class list file to use instead of the shipped one.
        min_pixels: drop images whose mask covers fewer pixels (default 0: keep all, as HSNet).
    """

    name = "fss1000"

    def __init__(self, root: str | Path, split: str = "test", classes: list[str] | None = None,
                 split_file: str | Path | None = None, min_pixels: int = 0) -> None:
        self.folder = fss_folder(root)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: FSS data folder is missing")
        self.split = split
        if classes:
            names = list(classes)
        elif split_file:
            names = read_class_list(Path(split_file))
        elif split == "all":
            names = [p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        elif split in SPLIT_FILES:
            names = read_class_list(SPLIT_DIR / SPLIT_FILES[split])
        else:
            raise ValueError(f"FSS split must be train, val, test or all, got {split!r}")
        names = sorted(set(names))
        missing = [n for n in names if not (self.folder / n).is_dir()]
        if missing:
            raise DataError(f"{self.folder / missing[0]}: class folder is missing "
                            f"({len(missing)} of {len(names)} classes of split {split!r} are absent)")
        self.class_ids = list(range(1, len(names) + 1))
        self.class_names = dict(zip(self.class_ids, names))
        self.samples_by_class = {}
        for c, name in self.class_names.items():
            samples = []
            for image in sorted((self.folder / name).glob("*.jpg"), key=numeric_key):
                mask = image.with_suffix(".png")
                if not mask.is_file():
                    raise DataError(f"{mask}: mask of {image.name} is missing")
                if min_pixels and (read_label(mask, grey=True) >= MASK_THRESHOLD).sum() < min_pixels:
                    continue
                samples.append(Sample(f"{name}/{image.stem}", str(image), str(mask)))
            if not samples:
                raise DataError(f"{self.folder / name}: class folder holds no <n>.jpg + <n>.png pairs")
            self.samples_by_class[c] = samples

    def load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W, 3]`` uint8 and mask ``[H, W]`` (grey >= 128 -> 1, else 0).

        Raises:
            DataError: naming the file: unreadable, sizes differ, or a 0/1 mask (see :func:`binarise_mask`).
        """
        mask = binarise_mask(read_label(sample.mask_path, grey=True), sample.mask_path)
        image = read_rgb(sample.image_path)
        check_same_size(image, mask, sample.image_path, sample.mask_path)
        return image, mask
