"""Run folders and the plain-text records of a run: header, JSON-lines metrics, results tables.

TensorBoard scalars go through ``accelerator.log`` (the entry scripts create the one Accelerator with
``log_with="tensorboard"``); this module writes what a person or a script reads afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """Short SHA of the checkout (``+dirty`` when it has local changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header(title: str, rows: dict[str, Any]) -> str:
    """A short aligned block printed (and logged) at the start of a run."""
    width = max(len(k) for k in rows) if rows else 0
    lines = [f"== {title} ==", f"{'command':<{width}}  {' '.join(sys.argv)}", f"{'git':<{width}}  {git_revision()}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows.items()]
    return "\n".join(lines)


class MetricsLog:
    """Append-only JSON-lines file: one object per logging step / evaluation (rank 0 only)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], floatfmt: str = ".2f") -> str:
    """GitHub-flavoured table; floats formatted with ``floatfmt``."""
    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (tmp + rename) so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
