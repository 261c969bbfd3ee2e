"""Results as people read them: one evaluation's markdown, and tables over many ``results.json`` files.

    python -m fewshot.report runs/finetune/*/eval/*/results.json [--out table.md] [--by fold|benchmark]

A table has one row per (label, shot) and one column per fold (or benchmark), plus their mean, so a learned
method and the training-free ``prototype`` baseline evaluated on the same episodes sit side by side. A row's
label is the results' ``label`` (``eval.label``, e.g. two qgnet variants) or else their method.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common.io import write_text
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


def results_markdown(results: dict[str, Any]) -> str:
    """One evaluation (several seeds) as markdown: headline, per-class IoU per seed, region-map recall."""
    method = f"`{results['method']}` on " if results.get("method") else ""
    head = (f"# {method}{results['benchmark']} fold {results['fold']}, {results['shot']}-shot, "
            f"{results['protocol']} protocol\n\n{results['episodes']} episodes x {len(results['seeds'])} seeds "
            f"({results['seeds']}), checkpoint `{results['checkpoint']}`\n\n")
    n = len(results["seeds"])
    summary = markdown_table(["mIoU (%)", "FB-IoU (%)"], [[
        f"{100 * results['miou_mean']:.2f}" + (f" ± {100 * results['miou_std']:.2f}" if n > 1 else ""),
        f"{100 * results['fbiou_mean']:.2f}" + (f" ± {100 * results['fbiou_std']:.2f}" if n > 1 else "")]])
    names = list(results["per_seed"][0]["meter"]["per_class_name"])
    per_class = markdown_table(["seed", *names], [
        [r["seed"], *[100 * r["meter"]["per_class_name"].get(k, 0.0) for k in names]] for r in results["per_seed"]])
    text = head + summary + "\nPer-class IoU (%):\n\n" + per_class
    skipped = sum(len(r.get("skipped", [])) for r in results["per_seed"])
    if skipped:
        text += f"\n{skipped} episodes were skipped as bad input (listed in results.json) and are not scored.\n"
    recall = results["per_seed"][0].get("recall")
    if recall:
        thresholds = list(next(iter(recall.values())))
        text += "\nRegion-map recall of the ground-truth foreground at thresholds (paper Table 7, first seed):\n\n"
        text += markdown_table(["map", *[f"{t:g}" for t in thresholds]],
                               [[name, *[100 * v for v in r.values()]] for name, r in recall.items()], ".1f")
    return text


def fmt(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def row_label(results: dict[str, Any]) -> str:
    """The name of a results' table row: its ``label``, else its method (files from before labels: qgnet)."""
    return results.get("label") or results.get("method", "qgnet")


def results_table(results: list[dict[str, Any]], by: str = "fold") -> str:
    """Rows per (label, shot), one column per fold (or benchmark), then their mean; cells mIoU / FB-IoU in %."""
    keys = sorted({str(r[by]) for r in results})
    methods = list(dict.fromkeys(row_label(r) for r in results))
    lines = []
    for method in methods:
        for shot in sorted({r["shot"] for r in results}):
            rows = {str(r[by]): r for r in results if r["shot"] == shot and row_label(r) == method}
            if not rows:
                continue
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
            lines.append([method, f"{shot}-shot", *cells, mean])
    header = ["method", "shot", *[f"{by} {k}" for k in keys], "mean"]
    return markdown_table(header, lines) + "\ncells: mIoU / FB-IoU (%), mean ± std over evaluation seeds\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewshot.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files")
    parser.add_argument("--by", choices=["fold", "benchmark"], default="fold", help="table columns")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    table = results_table(load_results(args.results), args.by)
    print(table)
    if args.out:
        write_text(args.out, table)


if __name__ == "__main__":
    main()
