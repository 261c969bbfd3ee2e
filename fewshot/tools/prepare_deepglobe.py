"""Cut the DeepGlobe land-cover training set into PATNet's Deepglobe few-shot benchmark.

    python -m fewshot.tools.prepare_deepglobe --input deepglobe/train --out $FSS_DATA/Deepglobe [--workers 8]

The recipe is PATNet's ``data/preprocess.py`` (the one every CD-FSS paper uses; IFA ships the same):

1. each ``<id>_sat.jpg`` (2448x2448) and its RGB colour-coded ``<id>_mask.png`` are cut into a 6x6 grid of
   408x408 tiles (row/column ``i``/``j`` -> tile ``<id>_<i><j>``);
2. a tile is kept only when its mask holds at least two distinct colours and every colour present (black
   "unknown" included) covers more than 4.8% of the tile;
3. a kept tile is filed under every class whose exact colour it contains, with that class's binary mask:
   ``<out>/<c>/test/origin/<id>_<i><j>.jpg`` + ``<out>/<c>/test/groundtruth/<id>_<i><j>.png`` (0/255).
   The image tile is written once and hard-linked into the other class folders.

Class folders follow PATNet's label list, which is written in OpenCV's BGR order, so in RGB:
1 agriculture (255,255,0), 2 urban (0,255,255), 3 rangeland (255,0,255), 4 forest (0,255,0),
5 water (0,0,255), 6 barren (255,255,255).

Expected count. The PATNet paper reports 5,666 images, but its released recipe, run on the full 803-image
training set, keeps 9,175 tiles (PATNet issue #33; #17 reports 9,174, and the authors could not say where
5,666 came from). We follow the released code, so 9,175 kept tiles is what this command asserts when the
input is the full 803-pair set at the standard 6x6 grid (``--expect-tiles`` overrides it). IFA (issue #14)
reports 6,891 / 4,189 / 4,333 / 1,564 / 1,370 / 2,195 tiles for classes 1..6 with the same recipe; they are
printed beside ours for comparison, not asserted. With any other input size the counts are only printed.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from common.images import read_rgb
from fewshot.data.base import DataError, check_same_size
from fewshot.data.crossdomain import DEEPGLOBE_CLASS_NAMES
from fewshot.tools import link_or_copy

DEEPGLOBE_COLOURS = {1: (255, 255, 0), 2: (0, 255, 255), 3: (255, 0, 255), 4: (0, 255, 0), 5: (0, 0, 255),
                     6: (255, 255, 255)}
GRID = 6
MIN_COLOUR_FRACTION = 0.048
FULL_PAIRS = 803
FULL_KEPT_TILES = 9175
IFA_CLASS_COUNTS = {1: 6891, 2: 4189, 3: 4333, 4: 1564, 5: 1370, 6: 2195}
JPEG_QUALITY = 95  # what OpenCV's imwrite, used by PATNet, writes by default


@dataclass
class TileReport:
    """What the recipe made of an input set."""

    pairs: int = 0
    tiles: int = 0
    kept: int = 0
    unfiled: int = 0  # kept tiles whose colours are none of the 6 classes (e.g. unknown + an off-palette value)
    per_class: dict[int, int] = field(default_factory=lambda: {c: 0 for c in DEEPGLOBE_COLOURS})


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """Pack an RGB array ``[..., 3]`` uint8 into one int32 per pixel ``[...]`` (``r << 16 | g << 8 | b``)."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


CLASS_CODES = {c: int(colour_codes(np.array(rgb, dtype=np.uint8))) for c, rgb in DEEPGLOBE_COLOURS.items()}


def tile_classes(mask_codes: np.ndarray) -> list[int] | None:
    """Classes a mask tile ``[h, w]`` of colour codes is filed under, or None when the recipe drops it."""
    values, counts = np.unique(mask_codes, return_counts=True)
    if len(values) < 2 or counts.min() / mask_codes.size <= MIN_COLOUR_FRACTION:
        return None
    present = set(values.tolist())
    return [c for c, code in CLASS_CODES.items() if code in present]


def grid_tiles(height: int, width: int, grid: int) -> Iterator[tuple[int, int, slice, slice]]:
    """``(i, j, rows, cols)`` of a ``grid`` x ``grid`` cut with PATNet's bounds ``int(i * H / grid)``."""
    for i in range(grid):
        for j in range(grid):
            yield (i, j, slice(height * i // grid, height * (i + 1) // grid),
                   slice(width * j // grid, width * (j + 1) // grid))


def tile_pair(pair: tuple[str, Path, Path], out_dir: Path, grid: int) -> list[list[int] | None]:
    """Cut one image/mask pair and write its kept tiles; returns each tile's classes (None = dropped)."""
    stem, sat, mask = pair
    image, codes = read_rgb(sat), colour_codes(read_rgb(mask))
    check_same_size(image, codes, str(sat), str(mask))
    results = []
    for i, j, rows, cols in grid_tiles(*codes.shape, grid):
        classes = tile_classes(codes[rows, cols])
        results.append(classes)
        name = f"{stem}_{i}{j}"
        for n, class_id in enumerate(classes or []):
            folder = out_dir / str(class_id) / "test"
            if n == 0:
                first = folder / "origin" / f"{name}.jpg"
                first.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[rows, cols]).save(first, quality=JPEG_QUALITY)
            else:
                link_or_copy(first, folder / "origin" / f"{name}.jpg")
            binary = (codes[rows, cols] == CLASS_CODES[class_id]).astype(np.uint8) * 255
            (folder / "groundtruth").mkdir(parents=True, exist_ok=True)
            Image.fromarray(binary).save(folder / "groundtruth" / f"{name}.png")
    return results


def find_pairs(input_dir: Path) -> list[tuple[str, Path, Path]]:
    """``(id, <id>_sat.jpg, <id>_mask.png)`` sorted by id; an image without its mask (or the reverse) is an error."""
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input folder not found")
    sats = {p.name[: -len("_sat.jpg")]: p for p in input_dir.glob("*_sat.jpg")}
    masks = {p.name[: -len("_mask.png")]: p for p in input_dir.glob("*_mask.png")}
    for have, lack, suffix in ((sats, masks, "_mask.png"), (masks, sats, "_sat.jpg")):
        orphans = sorted(set(have) - set(lack))
        if orphans:
            raise DataError(f"{input_dir / (orphans[0] + suffix)}: missing, but {have[orphans[0]].name} is there "
                            f"({len(orphans)} such unpaired file(s))")
    if not sats:
        raise DataError(f"{input_dir}: no <id>_sat.jpg / <id>_mask.png pairs (the DeepGlobe land-cover train folder)")
    return [(stem, sats[stem], masks[stem]) for stem in sorted(sats)]


def prepare_deepglobe(input_dir: str | Path, out_dir: str | Path, grid: int = GRID, workers: int = 1) -> TileReport:
    """Run the recipe on every pair of ``input_dir`` into ``out_dir`` (which must not hold a previous run).

    Raises:
        DataError: unpaired, unreadable or size-mismatched inputs, or an ``out_dir`` already holding class folders.
    """
    if not 1 <= grid <= 10:
        raise ValueError(f"grid must be within 1..10 (tile names use one digit per index), got {grid}")
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    pairs = find_pairs(input_dir)
    existing = [out_dir / str(c) for c in DEEPGLOBE_COLOURS if (out_dir / str(c)).exists()]
    if existing:
        raise DataError(f"{existing[0]}: already exists; remove the previous output or choose another --out")
    report = TileReport(pairs=len(pairs))
    work = partial(tile_pair, out_dir=out_dir, grid=grid)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_pair = list(pool.map(work, pairs, chunksize=4))
    else:
        per_pair = [work(pair) for pair in pairs]
    for tiles in per_pair:
        for classes in tiles:
            report.tiles += 1
            if classes is None:
                continue
            report.kept += 1
            report.unfiled += int(not classes)
            for class_id in classes:
                report.per_class[class_id] += 1
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 1 bad input or unexpected count)."""
    parser = argparse.ArgumentParser(prog="python -m fewshot.tools.prepare_deepglobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="DeepGlobe land-cover train folder (<id>_sat.jpg + <id>_mask.png)")
    parser.add_argument("--out", required=True, help="the Deepglobe benchmark root to create")
    parser.add_argument("--grid", type=int, default=GRID, help=f"tiles per side (default {GRID}: 2448 -> 408)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--expect-tiles", type=int, default=None,
                        help=f"kept-tile count to assert (default: {FULL_KEPT_TILES} for the full {FULL_PAIRS}-pair "
                             f"set at grid {GRID}, nothing otherwise)")
    args = parser.parse_args(argv)
    try:
        report = prepare_deepglobe(args.input, args.out, args.grid, args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    full = report.pairs == FULL_PAIRS and args.grid == GRID
    print(f"{report.pairs} image/mask pairs -> {report.tiles} tiles, {report.kept} kept"
          + (f" ({report.unfiled} of them match no class colour and were not filed)" if report.unfiled else ""))
    for class_id, n in report.per_class.items():
        reference = f"  (IFA reports {IFA_CLASS_COUNTS[class_id]})" if full else ""
        print(f"class {class_id} ({DEEPGLOBE_CLASS_NAMES[class_id]}): {n} tiles{reference}")
    expected = args.expect_tiles if args.expect_tiles is not None else (FULL_KEPT_TILES if full else None)
    if expected is None:
        print(f"note: {report.pairs} of the {FULL_PAIRS} DeepGlobe training pairs (or a non-standard grid): "
              "counts are printed, not asserted")
    elif report.kept != expected:
        print(f"error: kept {report.kept} tiles, expected {expected}. Check that {args.input} holds DeepGlobe's "
              "original 2448x2448 train files (masks not re-encoded or resized); the output in "
              f"{args.out} does not match the standard benchmark", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
