"""Build PATNet's ISIC-2018 class folders from class_id.csv (the layout :class:`Isic2018` reads).

    python -m fewshot.tools.prepare_isic --input ISIC/ISIC2018_Task1-2_Training_Input --out ISIC \\
        [--masks ISIC/ISIC2018_Task1_Training_GroundTruth] [--class-csv my_class_id.csv]

writes ``<out>/ISIC2018_Task1-2_Training_Input/<1|2|3>/<id>.jpg`` (1 nevus, 2 seborrheic keratosis,
3 melanoma) and, with ``--masks``, ``<out>/ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png``.
Files are hard-linked (copied where links are impossible), so running it in place (``--out`` = the parent
of ``--input``, PATNet's layout) costs no disk. Every id of the csv must be present: with the shipped csv
that is the 2,594 images of the ISIC-2018 task 1 training set. Nothing is written unless all inputs are
there; otherwise the command exits 1 naming the first missing file.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from fewshot.data.base import DataError
from fewshot.data.crossdomain import ISIC_CLASS_CSV, ISIC_CLASS_IDS, ISIC_TRAIN_IMAGES, Isic2018, read_isic_class_csv
from fewshot.tools import link_or_copy


def prepare_isic(input_dir: str | Path, out_dir: str | Path, class_csv: str | Path = ISIC_CLASS_CSV,
                 masks_dir: str | Path | None = None) -> dict[int, int]:
    """Link every csv-listed ``<input_dir>/<id>.jpg`` into its class folder under ``out_dir``.

    Returns:
        ``class id -> number of images`` filed.

    Raises:
        DataError: an input listed in the csv is missing (the first one is named), the shipped csv does not
            hold 2,594 rows, or a class folder already holds images the csv does not put there.
    """
    input_dir, out_dir, class_csv = Path(input_dir), Path(out_dir), Path(class_csv)
    classes = read_isic_class_csv(class_csv)
    if class_csv.resolve() == ISIC_CLASS_CSV and len(classes) != ISIC_TRAIN_IMAGES:
        raise DataError(f"{class_csv}: {len(classes)} rows, expected {ISIC_TRAIN_IMAGES}; the shipped csv is damaged")
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input folder not found")
    jobs = [(input_dir / f"{i}.jpg", out_dir / Isic2018.IMAGES / str(c) / f"{i}.jpg")
            for i, c in sorted(classes.items())]
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        jobs += [(masks_dir / f"{i}_segmentation.png", out_dir / Isic2018.MASKS / f"{i}_segmentation.png")
                 for i in sorted(classes)]
    missing = [src for src, _ in jobs if not src.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: missing input (listed in {class_csv}); {len(missing)} of {len(jobs)} "
                        "inputs are missing")
    expected = {dst for _, dst in jobs}
    for class_id in ISIC_CLASS_IDS.values():
        folder = out_dir / Isic2018.IMAGES / str(class_id)
        stale = sorted(p for p in folder.glob("*.jpg") if p not in expected) if folder.is_dir() else []
        if stale:
            raise DataError(f"{stale[0]}: {folder} already holds {len(stale)} image(s) that {class_csv} does not "
                            "assign to it; empty the class folders first")
    for src, dst in jobs:
        link_or_copy(src, dst)
    return dict(sorted(Counter(classes.values()).items()))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 1 bad or missing input)."""
    parser = argparse.ArgumentParser(prog="python -m fewshot.tools.prepare_isic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder holding the ISIC_<id>.jpg training images")
    parser.add_argument("--out", required=True, help="the ISIC benchmark root to build")
    parser.add_argument("--class-csv", default=str(ISIC_CLASS_CSV), help="ID,Class csv (default: PATNet's, shipped)")
    parser.add_argument("--masks", help="ISIC2018_Task1_Training_GroundTruth folder to link beside the images")
    args = parser.parse_args(argv)
    input_dir = Path(args.input)
    try:
        counts = prepare_isic(input_dir, args.out, args.class_csv, args.masks)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    names = {c: n for n, c in ISIC_CLASS_IDS.items()}
    for class_id, n in counts.items():
        print(f"class {class_id} ({names[class_id]}): {n} images")
    print(f"total: {sum(counts.values())} images -> {Path(args.out) / Isic2018.IMAGES}")
    listed = read_isic_class_csv(args.class_csv)
    unlisted = sorted(p.name for p in input_dir.glob("*.jpg") if p.stem not in listed)
    if unlisted:
        print(f"note: {len(unlisted)} image(s) in {input_dir} are not in the csv and were not filed, "
              f"e.g. {unlisted[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
