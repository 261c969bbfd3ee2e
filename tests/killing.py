"""Shared by the kill-and-resume tests of both stages: SIGKILL a run once a checkpoint is on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_checkpoint(proc: subprocess.Popen, latest: Path, at_least: str, timeout: float = 300) -> None:
    """Wait until ``latest`` names a checkpoint >= ``at_least`` (e.g. ``step_0000002``), then SIGKILL the run's
    whole process group; fails if the run ended on its own first (then it was never interrupted)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= at_least:
            break
        time.sleep(0.02)
    was_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert was_running, "the run ended before it could be killed; make it longer"
