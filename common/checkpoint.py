"""Atomic, verified, resumable training checkpoints on top of ``accelerator.save_state``.

Layout of a run folder::

    RUN_DIR/checkpoints/step_0000200/  model.safetensors, optimizer.bin, random_states_<rank>.pkl  (accelerate)
                                       extra_state.safetensors   queues, pointers, anything tensor-valued
                                       train_state.json          step, epoch, config hash
                                       manifest.json             size + sha256 of every file above (written last)
    RUN_DIR/checkpoints/latest         text file naming the newest complete checkpoint folder

A checkpoint is written into ``step_XXXXXXX.tmp``; ``manifest.json`` is the last file written there, then the
folder is renamed and ``latest`` is replaced atomically. A run killed at any moment leaves either the previous
or the new checkpoint, never a half-written one, and a ``.tmp`` folder is never picked up.

Reading a checkpoint back:

* :func:`find_checkpoint` / :func:`select_checkpoint` check a folder against its manifest (every file present,
  same size, same sha256). With ``--resume auto`` a checkpoint that fails (a truncated or changed file, a
  missing manifest) is skipped with a :class:`CheckpointWarning` naming the files, and the newest one that
  passes is used; a folder named explicitly that fails is a :class:`CheckpointError`.
* Folders written before manifests existed (``train_state.json`` without ``_checkpoint_format``) cannot be
  verified; they are accepted with a :class:`CheckpointWarning`. A folder that records the format but has no
  manifest is treated as damaged.
* :func:`load_checkpoint` also makes sure this process's ``random_states_<rank>.pkl`` exists, loads safely and
  was applied: accelerate's ``load_state`` swallows a bad RNG file and resumes with whatever random state the
  process had, so the resumed run would silently diverge. That is an :class:`InexactResumeError` unless the
  caller passes ``allow_inexact=True``.
* :func:`check_resume_compatible` compares the settings recorded in ``train_state.json`` with the current run.

Everything is read back without unpickling code: accelerate loads with ``weights_only=True`` (and so does the
RNG check here, through accelerate's own loader), the extra state is safetensors and the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from common.io import write_text

LATEST = "latest"
EXTRA_STATE = "extra_state.safetensors"
TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
RNG_STATE = "random_states_{rank}.pkl"  # accelerate's RNG_STATE_NAME + "_<process index>.pkl"
FORMAT_KEY = "_checkpoint_format"  # recorded in train_state.json; absent in folders written before manifests
FORMAT = 2

_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20

# where the values compared by check_resume_compatible come from, for the error message
RESUME_KEY_SOURCES = {
    "global_batch": "train.batch_size x processes",
    "world_size": "number of processes",
    "arch": "model.arch",
    "steps_per_epoch": "images per epoch / global batch",
    "total_steps": "train.max_steps, or train.epochs x steps per epoch",
    "augment_on": "data.augment_on (auto: device on CUDA, worker on CPU)",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the folder and the offending files."""


class InexactResumeError(CheckpointError):
    """Resuming would work but not continue the run exactly (e.g. an unusable RNG state file)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, could not be verified, or the resume is knowingly not exact."""


@dataclass(frozen=True)
class CheckpointReport:
    """Result of :func:`verify_checkpoint`: ``problems`` is empty when the folder matches its manifest.

    ``legacy`` marks a folder written before manifests existed: it has no problems but was not verified.
    """

    path: Path
    problems: tuple[str, ...] = ()
    legacy: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class CheckpointChoice:
    """Result of :func:`select_checkpoint`.

    Attributes:
        path: the checkpoint to resume from, or None when the run has none.
        skipped: newer checkpoints that failed verification, newest first, each with its problems.
        warnings: every warning that was emitted (also sent through ``warnings.warn``).
    """

    path: Path | None
    skipped: tuple[CheckpointReport, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / "checkpoints"


# --------------------------------------------------------------------------------------------------
# writing


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, extra_tensors: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep_last: int = 3) -> Path | None:
    """Save the accelerate state plus ``extra_tensors`` and ``train_state``; returns the folder on rank 0.

    Every rank must call this (accelerate saves per-rank RNG states); only rank 0 writes the manifest, renames
    and prunes. ``train_state`` must be JSON-serialisable; ``_checkpoint_format`` is added to it on disk.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's random_states_<rank>.pkl is on disk before the manifest lists it
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA_STATE))
        (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, FORMAT_KEY: FORMAT}, indent=2))
        _write_manifest(tmp, step)  # last: a folder with a manifest is complete
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(root / LATEST, final.name)
    _prune(root, keep_last)
    return final


def _write_manifest(folder: Path, step: int) -> None:
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
             for rel in _listed_files(folder)}
    write_text(folder / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))


# --------------------------------------------------------------------------------------------------
# verifying and choosing


def verify_checkpoint(path: str | Path) -> CheckpointReport:
    """Check ``path`` against its ``manifest.json``: every listed file present, same size, same sha256.

    Files in the folder that the manifest does not list are problems too (hidden files are ignored). A folder
    without a manifest is ``legacy`` (accepted, unverified) only when its ``train_state.json`` predates
    manifests; otherwise the missing manifest is a problem. Never raises for a damaged folder: the problems
    are returned, each naming its file.
    """
    path = Path(path)
    if not path.is_dir():
        return CheckpointReport(path, (f"{path}: not a folder",))
    state_file = path / TRAIN_STATE
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        if not state_file.is_file():
            return CheckpointReport(path, (f"{TRAIN_STATE} and {MANIFEST} are missing",))
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as err:
            return CheckpointReport(path, (f"{MANIFEST} is missing and {TRAIN_STATE} is unreadable ({err})",))
        if isinstance(state, dict) and FORMAT_KEY not in state:
            return CheckpointReport(path, legacy=True)
        missing = f"{MANIFEST} is missing (the folder was written with manifests, so it is incomplete or was altered)"
        return CheckpointReport(path, (missing,))
    try:
        manifest = json.loads(manifest_file.read_text())
        listed: dict[str, dict[str, Any]] = manifest["files"]
        expected = {rel: (int(meta["size"]), str(meta["sha256"])) for rel, meta in listed.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return CheckpointReport(path, (f"{MANIFEST} is unreadable ({type(err).__name__}: {err})",))

    problems = []
    for rel, (size, digest) in sorted(expected.items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
            continue
        actual = file.stat().st_size
        if actual != size:
            problems.append(f"{rel} is truncated or changed ({actual} bytes, the manifest says {size})")
        elif _sha256(file) != digest:
            problems.append(f"{rel} was changed (its sha256 differs from the manifest's)")
    problems += [f"{rel} is not listed in {MANIFEST}" for rel in _listed_files(path) if rel not in expected]
    if TRAIN_STATE not in expected:
        problems.append(f"{MANIFEST} does not list {TRAIN_STATE}")
    return CheckpointReport(path, tuple(problems))


def select_checkpoint(run_dir: str | Path, resume: str) -> CheckpointChoice:
    """Resolve ``--resume`` to a verified checkpoint and say what was skipped on the way.

    ``resume="auto"``: the checkpoint named by ``latest`` (else the highest step), verified; if it fails, the
    older ones newest first; every skipped folder is reported in one :class:`CheckpointWarning` naming its
    files. Returns ``path=None`` when the run has no checkpoint folder at all.
    Otherwise ``resume`` is a checkpoint folder, which must pass verification.

    Raises:
        FileNotFoundError: an explicit ``resume`` that is not a checkpoint folder.
        CheckpointError: an explicit checkpoint that fails verification, or ``auto`` when checkpoints exist
            but none passes (resuming from scratch would silently throw the run away).
    """
    notes: list[str] = []
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {TRAIN_STATE} inside)")
        report = verify_checkpoint(path)
        if not report.ok:
            raise CheckpointError(f"--resume {resume}: the checkpoint failed verification: "
                                  f"{'; '.join(report.problems)}. Pick another checkpoint or use --resume auto")
        if report.legacy:
            notes.append(_legacy_note(path))
        _warn(notes)
        return CheckpointChoice(path, (), tuple(notes))

    skipped: list[CheckpointReport] = []
    for candidate in _candidates(checkpoint_dir(run_dir)):
        report = verify_checkpoint(candidate)
        if not report.ok:
            skipped.append(report)
            continue
        if skipped:
            notes.append(f"{_describe_skipped(skipped)}; resuming from {candidate} instead")
        if report.legacy:
            notes.append(_legacy_note(candidate))
        _warn(notes)
        return CheckpointChoice(candidate, tuple(skipped), tuple(notes))
    if skipped:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} passed verification: "
                              f"{_describe_skipped(skipped)}. Remove them to start the run from scratch, or "
                              "resume from a copy you trust")
    return CheckpointChoice(None)


def find_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """Resolve ``--resume`` (see :func:`select_checkpoint`): ``"auto"`` -> the run's newest checkpoint that
    passes verification (None if there is none; skipped ones are warned about), else a verified folder."""
    return select_checkpoint(run_dir, resume).path


def _candidates(root: Path) -> list[Path]:
    """``latest``'s target first, then the complete-named folders of lower steps, newest first.

    Folders newer than ``latest`` are left alone, as before: they belong to a branch the run abandoned when it
    was resumed from an older checkpoint (or to a save killed between rename and pointer update).
    """
    steps = {}
    if root.is_dir():
        for p in root.iterdir():
            match = _STEP_DIR.match(p.name)
            if match and p.is_dir():
                steps[p] = int(match.group(1))
    ordered = sorted(steps, key=steps.__getitem__, reverse=True)
    pointer = root / LATEST
    head = root / pointer.read_text().strip() if pointer.is_file() else None
    if head is None or head not in steps:
        return ordered
    return [head] + [p for p in ordered if steps[p] < steps[head]]


def _describe_skipped(skipped: list[CheckpointReport]) -> str:
    return "; ".join(f"skipped {r.path.name} ({', '.join(r.problems)})" for r in skipped)


def _legacy_note(path: Path) -> str:
    return (f"{path} has no {MANIFEST} (written before checkpoints had manifests): its files cannot be "
            "verified, resuming from it unverified")


def _warn(notes: Iterable[str]) -> None:
    for note in notes:
        warnings.warn(note, CheckpointWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# loading


def load_checkpoint(accelerator: Accelerator, path: str | Path, *, allow_inexact: bool = False,
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the accelerate state from ``path``; return (extra tensors on CPU, train state).

    Call it on every rank. ``verify`` checks the folder against its manifest first (it hashes every file
    again; pass ``verify=False`` when :func:`find_checkpoint` has just chosen ``path``). Before ``load_state``
    every rank checks that its ``random_states_<rank>.pkl`` exists and loads safely; afterwards that it was
    applied. The outcome is gathered, so all ranks raise together.

    Raises:
        CheckpointError: the folder fails verification (names the files).
        InexactResumeError: an RNG state file is missing, unreadable or was not applied (names the file),
            unless ``allow_inexact`` is True, in which case a :class:`CheckpointWarning` says the resumed run
            is not an exact continuation.
    """
    path = Path(path)
    if verify:
        report = verify_checkpoint(path)
        if not report.ok:
            raise CheckpointError(f"{path}: the checkpoint failed verification: {'; '.join(report.problems)}")
        if report.legacy:
            _warn([_legacy_note(path)])
    rng_file = path / RNG_STATE.format(rank=accelerator.process_index)
    try:
        rng_states, problem = _read_rng_state(rng_file), None
    except ValueError as err:
        rng_states, problem = None, str(err)
    _check_rng(accelerator, path, problem, allow_inexact)

    accelerator.load_state(str(path))

    problem = None
    if rng_states is not None and not _rng_applied(rng_states):
        problem = f"{rng_file}: accelerate's load_state did not apply this random state"
    _check_rng(accelerator, path, problem, allow_inexact)
    extra = load_file(str(path / EXTRA_STATE)) if (path / EXTRA_STATE).is_file() else {}
    state = json.loads((path / TRAIN_STATE).read_text())
    state.pop(FORMAT_KEY, None)
    return extra, state


def _check_rng(accelerator: Accelerator, path: Path, problem: str | None, allow_inexact: bool) -> None:
    """Raise (or warn) on every rank if any rank found a problem with its RNG state."""
    problems = [p for p in gather_object([problem]) if p]
    if not problems:
        return
    message = (f"resuming from {path} would not be exact: {'; '.join(problems)}. The random streams (augmentation, "
               "key shuffle, sampling) would continue from a different state than the interrupted run's")
    if not allow_inexact:
        raise InexactResumeError(message + ". Resume from another checkpoint, or pass allow_inexact=True to "
                                           "continue anyway")
    warnings.warn(message + "; continuing anyway (allow_inexact=True)", CheckpointWarning, stacklevel=3)


def _read_rng_state(file: Path) -> dict[str, Any]:
    """Load an accelerate RNG state file the way accelerate does (weights_only) and check it is usable."""
    if not file.is_file():
        others = sorted(p.name for p in file.parent.glob("random_states_*.pkl"))
        raise ValueError(f"{file} is missing (the checkpoint holds {', '.join(others) or 'no RNG state files'}; "
                         "was it written with a different number of processes?)")
    try:  # accelerate's own loader: torch.load(weights_only=True) with the numpy RNG types allowed
        states = accelerate_load(str(file))
    except Exception as err:  # any failure here is exactly what load_state would swallow
        detail = " ".join(str(err).split())  # torch's message spans lines
        raise ValueError(f"{file} cannot be loaded safely ({type(err).__name__}: {detail})") from err
    if not isinstance(states, dict):
        raise ValueError(f"{file} does not hold an RNG state mapping (got {type(states).__name__})")
    required = ["random_state", "numpy_random_seed", "torch_manual_seed"]
    if torch.cuda.is_available():
        required.append("torch_cuda_manual_seed")
    missing = [k for k in required if k not in states]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)} (saved on a machine without CUDA?)")
    try:  # apply to throw-away generators: the process's own streams are untouched until load_state
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and len(states["torch_cuda_manual_seed"]) > torch.cuda.device_count():
            raise ValueError(f"it holds {len(states['torch_cuda_manual_seed'])} CUDA generator states, this "
                             f"process sees {torch.cuda.device_count()} devices")
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{file} holds an unusable RNG state ({err})") from err
    return states


def _rng_applied(states: dict[str, Any]) -> bool:
    """Whether the process's python and torch CPU generators now hold the states read from the file."""
    saved_py = states["random_state"]
    return (torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
            and _as_tuple(random.getstate()) == _as_tuple(saved_py))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------------------------------
# resume compatibility


def check_resume_compatible(state: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path,
                            allow: Iterable[str] = (), sources: Mapping[str, str] | None = None) -> None:
    """Compare settings recorded in a checkpoint's train state with the current run's.

    Args:
        state: the train state returned by :func:`load_checkpoint`.
        expected: this run's values of the keys to compare, e.g. ``{"global_batch": 4, "arch": "resnet50"}``
            (compared in their JSON form, so tuples match lists).
        path: the checkpoint folder (named in messages).
        allow: keys whose difference is accepted; each accepted difference is a :class:`CheckpointWarning`
            saying the run is no longer an exact continuation.
        sources: where each value comes from, for the message (defaults to :data:`RESUME_KEY_SOURCES`).

    Raises:
        CheckpointError: naming every differing key not in ``allow``, with the checkpoint's and this run's
            value. Keys the checkpoint does not record are warned about, not errors.
    """
    allowed, sources = set(allow), dict(RESUME_KEY_SOURCES if sources is None else sources)
    name = Path(path).name
    refused, accepted, unrecorded = [], [], []
    for key, current in expected.items():
        if key not in state:
            if key not in allowed:
                unrecorded.append(key)
            continue
        saved = state[key]
        if _json_form(saved) == _json_form(current):
            continue
        where = f" ({sources[key]})" if key in sources else ""
        line = f"{key}={_show(saved)}, this run has {_show(current)}{where}"
        (accepted if key in allowed else refused).append(line)
    if unrecorded:
        warnings.warn(f"checkpoint {name} does not record {', '.join(unrecorded)}: resuming without checking "
                      "them", CheckpointWarning, stacklevel=2)
    if accepted:
        warnings.warn(f"checkpoint {name} was written with {'; '.join(accepted)}; resuming anyway as allowed, "
                      "the run is no longer an exact continuation", CheckpointWarning, stacklevel=2)
    if refused:
        raise CheckpointError(f"checkpoint {name} was written with {'; '.join(refused)}; resume with the same "
                              "settings or start a new run")


def _json_form(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        return repr(value)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(_json_form(value))


# --------------------------------------------------------------------------------------------------
# helpers

def _listed_files(folder: Path) -> list[str]:
    """Files a manifest lists: everything under ``folder`` except the manifest (and its tmp) and hidden files."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in (MANIFEST, MANIFEST + ".tmp") and not any(
                part.startswith(".") for part in p.relative_to(folder).parts):
            out.append(rel)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()



def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
