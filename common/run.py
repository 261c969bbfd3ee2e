"""The run scaffold both entry points share, and the pieces both training loops repeat.

``start_run`` makes the one ``Accelerator`` of a run (with the configured trackers), seeds it, creates the run
folder, saves the resolved config and prints the header. The loop bodies stay in each stage's engine, written
out step by step; what they have in common lives here: resuming (:func:`resume_from`), setting the learning
rate of every parameter group (:func:`set_lr`), the logging / checkpoint cadence (:func:`due`) and the
progress bar + trackers + ``metrics.jsonl`` of :class:`TrainLog`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from common.checkpoint import (
    TRAIN_STATE,
    CheckpointError,
    CheckpointWarning,
    InexactResumeError,
    check_resume_compatible,
    find_checkpoint,
    load_checkpoint,
)
from common.config import dump_yaml, flatten, save_config
from common.runlog import MetricsLog, run_header

# accelerate's tracker names -> the availability check accelerate itself uses
TRACKERS = {"tensorboard": "is_tensorboard_available", "wandb": "is_wandb_available",
            "mlflow": "is_mlflow_available", "aim": "is_aim_available", "comet_ml": "is_comet_ml_available",
            "clearml": "is_clearml_available", "dvclive": "is_dvclive_available"}


def check_trackers(names: Sequence[str], key: str = "train.trackers") -> None:
    """Raise ValueError naming ``key`` for an unknown tracker or one whose package is not installed.

    accelerate drops unavailable trackers with a log line; a run asked to log somewhere must not lose its logs.
    """
    import accelerate.utils

    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"{key}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} (or [] for none)")
        if not getattr(accelerate.utils, TRACKERS[name])():
            raise ValueError(f"{key}: tracker {name!r} is not installed (pip install {name.replace('_', '-')})")


def start_run(cfg: Any, title: str, run_dir: Path, config_path: str | None, seed: int, deterministic: bool,
              trackers: Sequence[str], kwargs_handlers: Iterable[Any] = (),
              header: dict[str, Any] | None = None, mixed_precision: str | None = None) -> Accelerator:
    """Make the run's Accelerator, seed every RNG, write ``config.yaml`` and print the header (rank 0).

    Args:
        cfg: the validated config (saved resolved, printed as YAML).
        title: the header's first line.
        run_dir: the run folder (created).
        config_path: the YAML the run was started from (for the header), None for schema defaults.
        seed: ``accelerate.utils.set_seed`` on every rank (same initialisation everywhere).
        deterministic: ``torch.use_deterministic_algorithms(True)`` (bit-exact resume checks).
        trackers: accelerate ``log_with`` names (checked by :func:`check_trackers` in the config).
        kwargs_handlers: accelerate kwargs handlers (e.g. DDP settings).
        header: extra header rows.
        mixed_precision: ``no`` / ``bf16`` / ``fp16`` for accelerate; None leaves it to the launcher.
    """
    if deterministic:
        torch.use_deterministic_algorithms(True)
    accelerator = Accelerator(log_with=list(trackers) or None, project_dir=str(run_dir),
                              kwargs_handlers=list(kwargs_handlers), mixed_precision=mixed_precision)
    set_seed(seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        accelerator.print(run_header(title, {
            "config": config_path or "<schema defaults>", "run dir": run_dir,
            "processes": accelerator.num_processes, "device": accelerator.device,
            "mixed precision": accelerator.mixed_precision, **(header or {})}))
        accelerator.print(dump_yaml(cfg))
    return accelerator


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The same learning rate for every parameter group (the schedules are functions of the step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, checkpoint) runs after ``step``: every ``every`` steps and at the end."""
    return (every > 0 and step % every == 0) or step == total


@dataclass
class Resumed:
    """Where a run continues from: ``step`` 0 and no checkpoint for a fresh start."""

    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)     # train_state.json of the checkpoint
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # extra tensors (queues, ...), on CPU
    checkpoint: Path | None = None


def resume_from(accelerator: Accelerator, run_dir: Path, resume: str | None, expected: dict[str, Any],
                allow_inexact: bool = False) -> Resumed:
    """Restore the newest (or the given) checkpoint into the prepared objects, or start fresh.

    ``expected`` holds the settings the checkpoint must have been written with (e.g. ``global_batch``, ``arch``);
    a difference is an error naming both values, since the run could not continue exactly. With
    ``allow_inexact`` (``--allow-inexact-resume``) every such difference, and an RNG state that cannot be
    restored, is accepted with a :class:`~common.checkpoint.CheckpointWarning`, and the run says that it is no
    longer an exact continuation.
    """
    if not resume:
        return Resumed()
    found = find_checkpoint(run_dir, resume)
    if found is None:
        accelerator.print(f"--resume {resume}: no checkpoint in {run_dir}, starting from scratch")
        return Resumed()
    state = json.loads((found / TRAIN_STATE).read_text())
    if not allow_inexact:
        try:
            check_resume_compatible(state, expected, found)
            extra, state = load_checkpoint(accelerator, found)
        except CheckpointError as err:
            if not _is_inexact_refusal(err):
                raise
            raise type(err)(f"{err} (on the command line, --allow-inexact-resume continues anyway; the run is "
                            "then no longer an exact continuation)") from err
        accelerator.print(f"resumed from {found} at step {state['step']}")
        return Resumed(state["step"], state, extra, found)
    accepted, extra, state = _resume_inexactly(accelerator, found, state, expected)
    accelerator.print(f"resumed from {found} at step {state['step']}")
    if accepted:
        accelerator.print(f"--allow-inexact-resume: accepted: {' | '.join(accepted)}. The run is no longer an exact "
                          f"continuation of {found}")
    else:
        accelerator.print("--allow-inexact-resume: the checkpoint matched this run's settings and RNG state; it "
                          "continues exactly")
    return Resumed(state["step"], state, extra, found)


def _is_inexact_refusal(err: CheckpointError) -> bool:
    """A refusal that ``--allow-inexact-resume`` would lift: other settings, or an unusable RNG state (not a
    damaged checkpoint)."""
    return isinstance(err, InexactResumeError) or "resume with the same settings" in str(err)


def _resume_inexactly(accelerator: Accelerator, found: Path, state: dict[str, Any], expected: dict[str, Any]
                      ) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Any]]:
    """Check and load ``found`` with every difference allowed.

    Returns the accepted differences (the checkpoint module's warnings about them, which are passed on as
    well), the extra tensors and the train state.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointWarning)
            check_resume_compatible(state, expected, found, allow=set(expected))
            extra, loaded = load_checkpoint(accelerator, found, allow_inexact=True)
    finally:
        for w in caught:  # pass every warning on, with its origin
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    accepted = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)
                and any(m in str(w.message) for m in ("no longer an exact continuation", "would not be exact"))]
    return accepted, extra, loaded


class TrainLog:
    """Progress bar (rank 0), trackers and ``metrics.jsonl`` of one training loop.

    Args:
        accelerator: the run's accelerator (trackers are initialised here, under ``project``).
        run_dir: where ``metrics.jsonl`` goes.
        project: tracker project name (``pretrain`` / ``finetune``), also the bar's label.
        cfg: logged as hyperparameters.
        total, initial: steps in all and the step a resumed run starts from.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, project: str, cfg: Any, total: int,
                 initial: int = 0) -> None:
        self.accelerator = accelerator
        accelerator.init_trackers(project, config=flatten(cfg))
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        if initial and accelerator.is_main_process:  # rows of steps the resumed run will redo would repeat
            self.metrics.truncate_after(initial)
        self.bar = tqdm(total=total, initial=initial, desc=project, dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process)
        self.tick = time.perf_counter()

    def advance(self) -> None:
        """One step done."""
        self.bar.update(1)

    def seconds_since_last(self) -> float:
        """Wall time since the previous :meth:`write` (or the start); resets the clock."""
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        return elapsed

    def write(self, step: int, scalars: dict[str, float], extra: dict[str, Any] | None = None,
              postfix: dict[str, str] | None = None) -> None:
        """Send ``scalars`` to the trackers and ``metrics.jsonl`` (with ``extra`` such as the epoch)."""
        self.accelerator.log(scalars, step=step)
        self.metrics.write({"step": step, **(extra or {}), **scalars})
        if postfix:
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()
