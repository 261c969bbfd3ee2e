"""Check a dataset tree: per split and fold, how many images and (image, class) pairs per class, and the first
missing or unreadable file. Exit status 1 when something is missing.

    python -m fewshot.data.check --benchmark pascal5i --root $FSS_DATA [--index-only]
    python -m fewshot.data.check --benchmark coco20i --root $FSS_DATA/COCO2014
    python -m fewshot.data.check --benchmark fss1000 --root $FSS_DATA --splits test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.images import image_size
from fewshot.data.base import DataError, FewShotBenchmark, Sample
from fewshot.data.config import DataConfig, default_root
from fewshot.data.registry import BUILDERS, build_benchmark

FOLDED = ("pascal5i", "coco20i")


def describe(bench: FewShotBenchmark) -> str:
    """One line per split: images, pairs, then ``class name: pairs`` for every class."""
    per_class = ", ".join(f"{c} {bench.class_names[c]}: {len(bench.samples_by_class.get(c, []))}"
                          for c in bench.class_ids)
    return f"{len(bench.image_keys())} images, {bench.num_pairs()} (image, class) pairs | {per_class}"


def file_problem(path: str, decode: bool) -> str | None:
    """Why ``path`` cannot be used (missing / unreadable), or None."""
    if not Path(path).is_file():
        return "missing"
    try:
        if decode:
            image_size(path)
        else:
            with Image.open(path):
                pass
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"unreadable ({err})"
    return None


def check_files(samples: dict[str, Sample], index_only: bool, decode: bool) -> list[str]:
    """Problems of the images (unless ``index_only``) and label files (PNG masks only) of the samples."""
    problems = []
    for sample in samples.values():
        paths = ([] if index_only else [sample.image_path]) + ([sample.mask_path] if sample.mask_path.endswith(
            ".png") else [])
        for path in paths:
            why = file_problem(path, decode)
            if why:
                problems.append(f"{path}: {why}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fewshot.data.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--root", default=default_root(), help="dataset root (default: $FSS_DATA or ./datasets)")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="splits to check")
    parser.add_argument("--folds", nargs="+", default=["0", "1", "2", "3"], help="folds (PASCAL / COCO)")
    parser.add_argument("--index-only", action="store_true", help="masks only: do not require images")
    parser.add_argument("--decode", action="store_true", help="fully decode every file (slow), not just headers")
    parser.add_argument("--min-pixels", type=int, default=DataConfig.min_pixels)
    parser.add_argument("--year", default="auto", choices=["auto", "2014", "2017"], help="COCO year")
    parser.add_argument("--cache-dir", default="", help="index cache folder")
    args = parser.parse_args(argv)
    base = DataConfig(benchmark=args.benchmark, root=args.root, min_pixels=args.min_pixels,
                      index_only=args.index_only, coco_year=args.year, cache_dir=args.cache_dir)
    # unfolded sets: FSS layouts use their split files; the semantic layout indexes every class with fold 'all'
    unfolded = ["all"] if args.benchmark == "semantic" else [0]
    folds = [int(f) if f.lstrip("-").isdigit() else f for f in args.folds] if args.benchmark in FOLDED else unfolded
    samples: dict[str, Sample] = {}
    failures = []
    for fold in folds:
        for split in args.splits:
            label = f"fold {fold} {split}" if args.benchmark in FOLDED else split
            try:
                bench = build_benchmark(dataclasses.replace(base, fold=fold), split)
            except (DataError, ValueError, FileExistsError) as err:
                failures.append(f"{label}: {err}")
                print(f"{label:>14}: FAILED - {err}")
                continue
            print(f"{label:>14}: {describe(bench)}")
            samples.update({s.key: s for c in bench.class_ids for s in bench.samples_by_class.get(c, [])})
    problems = check_files(samples, args.index_only, args.decode)
    print(f"checked {len(samples)} indexed images: {len(problems)} file problem(s)")
    if problems:
        print(f"first problem: {problems[0]}")
    if failures:
        print(f"first failure: {failures[0]}")
    return 1 if problems or failures else 0


if __name__ == "__main__":
    sys.exit(main())
