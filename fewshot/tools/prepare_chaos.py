"""Write the CHAOS MRI training volumes as the 2-D slices of the ``chaos_mri`` benchmark (CD-TG's CHAOS-MRI).

    pip install -e ".[chaos]"     # pydicom, to read the DICOM slices
    python -m fewshot.tools.prepare_chaos CHAOS_Train_Sets/Train_Sets/MR --out $FSS_DATA/CHAOS-MRI [--sequence T2SPIR]

Input: the MR part of the CHAOS challenge training release (chaos.grand-challenge.org), 20 patients::

    MR/<patient>/T2SPIR/DICOM_anon/IMG-<series>-<slice>.dcm      T2-SPIR (the default; few-shot MRI work uses it)
    MR/<patient>/T2SPIR/Ground/IMG-<series>-<slice>.png          grey levels: liver 63, right kidney 126,
    MR/<patient>/T1DUAL/DICOM_anon/InPhase|OutPhase/*.dcm          left kidney 189, spleen 252 (the release's
    MR/<patient>/T1DUAL/Ground/*.png                               ranges 55-70, 110-135, 175-200, 240-255)

DICOM files and ground-truth PNGs of a series are paired in sorted file order (the release names them alike);
a series whose counts differ is an error. Each volume is windowed to 8 bits between its 0.5th and 99.5th
intensity percentiles (MRI has no fixed intensity scale) and written as ``images/<patient>_<seq>_<slice>.png``
with ``labels/<same>.png`` (class indices 0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen) and
``index.csv`` (``key,classes``: the organs each slice shows, at least ``--min-pixels`` pixels each). Slices that
show no organ are not indexed (counted and printed). The counts per organ are printed, not asserted: the
release's slice counts per series vary (about 26-50).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import user_errors
from common.errors import DataError
from common.io import atomic_path

GROUND_RANGES = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}  # class -> grey range of Ground PNGs
SERIES = {"T2SPIR": ("T2SPIR/DICOM_anon", "T2SPIR/Ground"), "T1IN": ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground"),
          "T1OUT": ("T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground")}


def ground_to_classes(grey: np.ndarray) -> np.ndarray:
    """CHAOS ground-truth grey levels ``[H, W]`` -> class indices (0 where no organ's range matches)."""
    out = np.zeros(grey.shape, np.uint8)
    for c, (low, high) in GROUND_RANGES.items():
        out[(grey >= low) & (grey <= high)] = c
    return out


def window(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """``volume [S, H, W]`` (any dtype) -> uint8, linear between its ``low`` and ``high`` percentiles."""
    lo, hi = np.percentile(volume, [low, high])
    scaled = (volume.astype(np.float64) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_dicom(path: Path) -> np.ndarray:
    """One DICOM slice's pixels ``[H, W]`` (pydicom; a clear error when it is not installed)."""
    try:
        import pydicom
    except ModuleNotFoundError:
        raise DataError("reading the CHAOS DICOM slices needs pydicom: pip install -e \".[chaos]\" "
                        "(or pip install pydicom)") from None
    try:
        return np.asarray(pydicom.dcmread(str(path)).pixel_array)
    except Exception as err:  # pydicom raises many types for damaged files
        raise DataError(f"{path}: unreadable DICOM slice ({err})") from err


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def prepare_chaos(mr_root: str | Path, out: str | Path, sequence: str = "T2SPIR",
                  min_pixels: int = 1) -> dict[str, int]:
    """Write every patient's ``sequence`` series under ``out`` (layout in the module docstring).

    Returns:
        counts: ``{"patients", "slices", "indexed", "without organ", <organ name>: slices}``.

    Raises:
        DataError: no patient folder, a series missing or with unequal DICOM / ground-truth counts.
    """
    from fewshot.data.crossdomain import CHAOS_CLASS_NAMES

    mr_root, out = Path(mr_root), Path(out)
    if sequence not in SERIES:
        raise DataError(f"--sequence {sequence!r}: one of {', '.join(SERIES)}")
    dicom_sub, ground_sub = SERIES[sequence]
    patients = sorted((p for p in mr_root.iterdir() if p.is_dir() and (p / dicom_sub).is_dir()),
                      key=lambda p: (len(p.name), p.name)) if mr_root.is_dir() else []
    if not patients:
        raise DataError(f"{mr_root}: no <patient>/{dicom_sub}/ folder; give the MR folder of the CHAOS "
                        "training release (CHAOS_Train_Sets/Train_Sets/MR)")
    counts = {"patients": len(patients), "slices": 0, "indexed": 0, "without organ": 0,
              **{name: 0 for name in CHAOS_CLASS_NAMES.values()}}
    rows = []
    for patient in patients:
        dicoms = sorted((patient / dicom_sub).glob("*.dcm"))
        grounds = sorted((patient / ground_sub).glob("*.png"))
        if not dicoms or len(dicoms) != len(grounds):
            raise DataError(f"{patient}: {len(dicoms)} DICOM slices in {dicom_sub} but {len(grounds)} ground-truth "
                            f"PNGs in {ground_sub}; they pair one to one")
        volume = window(np.stack([read_dicom(p) for p in dicoms]))
        for i, (pixels, ground) in enumerate(zip(volume, grounds)):
            labels = ground_to_classes(np.asarray(Image.open(ground).convert("L")))
            if labels.shape != pixels.shape:
                raise DataError(f"{ground}: {labels.shape[1]}x{labels.shape[0]} but its slice {dicoms[i]} is "
                                f"{pixels.shape[1]}x{pixels.shape[0]}")
            key = f"{patient.name}_{sequence}_{i:03d}"
            _save_png(pixels, out / "images" / f"{key}.png")
            _save_png(labels, out / "labels" / f"{key}.png")
            present = [c for c in CHAOS_CLASS_NAMES if (labels == c).sum() >= max(min_pixels, 1)]
            counts["slices"] += 1
            if not present:
                counts["without organ"] += 1
                continue
            counts["indexed"] += 1
            for c in present:
                counts[CHAOS_CLASS_NAMES[c]] += 1
            rows.append((key, " ".join(map(str, present))))
    with atomic_path(out / "index.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "classes"])
        writer.writerows(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fewshot.tools.prepare_chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mr_root", help="the MR folder of the CHAOS training release")
    parser.add_argument("--out", required=True, help="the CHAOS-MRI benchmark folder to write")
    parser.add_argument("--sequence", default="T2SPIR", choices=sorted(SERIES))
    parser.add_argument("--min-pixels", type=int, default=1, help="smallest organ area that indexes a slice")
    args = parser.parse_args(argv)
    counts = prepare_chaos(args.mr_root, args.out, args.sequence, args.min_pixels)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
