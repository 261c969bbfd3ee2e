"""Atomic, resumable training checkpoints on top of ``accelerator.save_state``.

Layout of a run folder::

    RUN_DIR/checkpoints/step_000200/   model.safetensors, optimizer.bin, random_states_<rank>.pkl  (accelerate)
                                       extra_state.safetensors   queues, pointers, anything tensor-valued
                                       train_state.json          step, epoch, config hash
    RUN_DIR/checkpoints/latest         text file naming the newest complete checkpoint folder

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed only once complete, then ``latest`` is
replaced atomically, so a run killed at any moment leaves either the previous or the new checkpoint, never a
half-written one. Everything is read back without unpickling code: accelerate loads with
``weights_only=True`` and the extra state is safetensors + JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

LATEST = "latest"
EXTRA_STATE = "extra_state.safetensors"
TRAIN_STATE = "train_state.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, extra_tensors: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep_last: int = 3) -> Path | None:
    """Save the accelerate state plus ``extra_tensors`` and ``train_state``; returns the folder on rank 0.

    Every rank must call this (accelerate saves per-rank RNG states); only rank 0 renames and prunes.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA_STATE))
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, final.name)
    _prune(root, keep_last)
    return final


def find_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """Resolve ``--resume``: ``"auto"`` -> the run's newest checkpoint (None if there is none), else a folder."""
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {TRAIN_STATE} inside)")
        return path
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / TRAIN_STATE).is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / TRAIN_STATE).is_file())
    return complete[-1] if complete else None


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the accelerate state from ``path``; return (extra tensors on CPU, train state)."""
    path = Path(path)
    accelerator.load_state(str(path))
    extra = load_file(str(path / EXTRA_STATE)) if (path / EXTRA_STATE).is_file() else {}
    return extra, json.loads((path / TRAIN_STATE).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
