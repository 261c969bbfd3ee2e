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

from common.io import write_text

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

    def truncate_after(self, step: int) -> int:
        """Drop the rows logged after ``step`` (call on resume from a checkpoint at ``step``); return how many.

        Rows whose numeric ``step`` is > ``step`` are removed; rows without one (or lines that are not JSON
        objects) are kept as they are, except an unterminated, unparseable last line - a write cut short when
        the run was killed - which is dropped and counted. The file is rewritten atomically (tmp + rename) and
        only when something is dropped. Does nothing (returns 0) when disabled or when the file does not exist.
        """
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        kept, dropped = [], 0
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                if i == len(lines) - 1 and not line.endswith("\n"):
                    dropped += 1  # half-written by a killed run
                    continue
                row = None
            value = row.get("step") if isinstance(row, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            write_text(self.path, "".join(kept))
        return dropped


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], floatfmt: str = ".2f") -> str:
    """GitHub-flavoured table; floats formatted with ``floatfmt``."""
    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
