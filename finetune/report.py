"""Collect evaluation ``results.json`` files into one markdown table (per fold / per dataset, plus the mean).

    python -m finetune.report runs/finetune/*/eval/*/results.json [--out table.md] [--by fold|benchmark]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common.runlog import markdown_table


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Read results files; a file that is not a results file is an error naming it."""
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable results.json ({err})") from err
        if "miou_mean" not in data:
            raise ValueError(f"{path}: no 'miou_mean' - not written by finetune.evaluate")
        out.append(data)
    return out


def fmt(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def results_table(results: list[dict[str, Any]], by: str = "fold") -> str:
    """Rows grouped by shot, one column per fold (or benchmark), then their mean; cells are mIoU / FB-IoU in %."""
    keys = sorted({str(r[by]) for r in results})
    lines = []
    for shot in sorted({r["shot"] for r in results}):
        rows = {str(r[by]): r for r in results if r["shot"] == shot}
        cells, mious, fbious = [], [], []
        for key in keys:
            r = rows.get(key)
            if r is None:
                cells.append("-")
                continue
            n = len(r["seeds"])
            cells.append(f"{fmt(r['miou_mean'], r['miou_std'], n)} / {fmt(r['fbiou_mean'], r['fbiou_std'], n)}")
            mious.append(r["miou_mean"])
            fbious.append(r["fbiou_mean"])
        mean = f"{100 * statistics.mean(mious):.1f} / {100 * statistics.mean(fbious):.1f}" if mious else "-"
        lines.append([f"{shot}-shot", *cells, mean])
    header = ["shot", *[f"{by} {k}" for k in keys], "mean"]
    return markdown_table(header, lines) + "\ncells: mIoU / FB-IoU (%), mean ± std over evaluation seeds\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files")
    parser.add_argument("--by", choices=["fold", "benchmark"], default="fold", help="table columns")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    table = results_table(load_results(args.results), args.by)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
