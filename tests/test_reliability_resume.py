"""Checkpoint verification, RNG-state integrity, resume compatibility and metrics-log truncation.

Real checkpoints are written with ``accelerate.Accelerator(cpu=True)`` and a tiny ``nn.Linear`` + SGD.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

import common.checkpoint as ckpt
from common.checkpoint import (
    FORMAT_KEY,
    MANIFEST,
    TRAIN_STATE,
    CheckpointError,
    CheckpointWarning,
    InexactResumeError,
    check_resume_compatible,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
    verify_checkpoint,
)
from common.runlog import MetricsLog

RNG = "random_states_0.pkl"


class Trainer:
    """One process's worth of the engines' checkpoint calls, on a model small enough to run in milliseconds."""

    def __init__(self, run_dir: Path, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.run_dir = run_dir
        self.accelerator = Accelerator(cpu=True)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def step(self) -> None:
        loss = self.model(torch.randn(8, 4)).square().mean()
        self.optimizer.zero_grad()
        self.accelerator.backward(loss)
        self.optimizer.step()

    def save(self, step: int, **state) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, step, {"queue": torch.arange(3.0) + step},
                               {"step": step, "global_batch": 8, "arch": "linear", **state}, keep_last=0)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture()
def run(tmp_path) -> tuple[Trainer, dict[int, Path], dict[int, dict[str, torch.Tensor]]]:
    """A run with checkpoints at steps 2 and 4, and the weights each one holds."""
    trainer = Trainer(tmp_path / "run")
    folders, weights = {}, {}
    for step in range(1, 5):
        trainer.step()
        if step % 2 == 0:
            folders[step] = trainer.save(step)
            weights[step] = trainer.weights()
    return trainer, folders, weights


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """Turn any warning inside the block into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------------------
# manifest


def test_manifest_is_written_last_and_lists_every_file(tmp_path, monkeypatch):
    seen = {}
    real = ckpt._write_manifest

    def spy(folder: Path, step: int) -> None:
        seen["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        seen["folder"] = folder.name
        real(folder, step)

    monkeypatch.setattr(ckpt, "_write_manifest", spy)
    trainer = Trainer(tmp_path / "run")
    trainer.step()
    final = trainer.save(2)

    assert seen["folder"] == "step_0000002.tmp"  # written inside the tmp folder, before the rename
    on_disk = sorted(p.name for p in final.iterdir())
    assert sorted(seen["files"] + [MANIFEST]) == on_disk  # nothing was written after the manifest
    manifest = json.loads((final / MANIFEST).read_text())
    assert sorted(manifest["files"]) == seen["files"]
    assert {"model.safetensors", "optimizer.bin", RNG, TRAIN_STATE, ckpt.EXTRA_STATE} <= set(manifest["files"])
    for rel, meta in manifest["files"].items():
        assert meta["size"] == (final / rel).stat().st_size
        assert meta["sha256"] == ckpt._sha256(final / rel)
    newest_other = max((final / rel).stat().st_mtime_ns for rel in manifest["files"])
    assert (final / MANIFEST).stat().st_mtime_ns >= newest_other
    assert verify_checkpoint(final).ok


def test_save_killed_before_manifest_leaves_tmp_that_is_never_picked(run, monkeypatch):
    trainer, folders, _ = run

    def killed(folder: Path, step: int) -> None:
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr(ckpt, "_write_manifest", killed)
    trainer.step()
    with pytest.raises(KeyboardInterrupt):
        trainer.save(6)
    tmp = trainer.run_dir / "checkpoints" / "step_0000006.tmp"
    assert (tmp / "model.safetensors").is_file() and (tmp / TRAIN_STATE).is_file() and not (tmp / MANIFEST).exists()
    with no_warnings():
        assert find_checkpoint(trainer.run_dir, "auto") == folders[4]

    # even if such a folder got a final name (and `latest` pointed at it), it is not trusted: it records the
    # manifest format in train_state.json but has no manifest
    tmp.rename(tmp.with_suffix(""))
    (trainer.run_dir / "checkpoints" / "latest").write_text("step_0000006")
    with pytest.warns(CheckpointWarning, match=r"step_0000006 \(manifest.json is missing"):
        choice = select_checkpoint(trainer.run_dir, "auto")
    assert choice.path == folders[4]
    assert [r.path.name for r in choice.skipped] == ["step_0000006"]
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        find_checkpoint(trainer.run_dir, str(tmp.with_suffix("")))


def test_truncated_model_in_newest_falls_back_with_warning(run):
    trainer, folders, weights = run
    model_file = folders[4] / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10])

    with pytest.warns(CheckpointWarning) as record:
        choice = select_checkpoint(trainer.run_dir, "auto")
    assert choice.path == folders[2]
    message = str(record[0].message)
    assert "step_0000004" in message and "model.safetensors is truncated" in message and "step_0000002" in message
    assert choice.warnings == (message,)
    size = model_file.stat().st_size
    assert choice.skipped[0].problems == (
        f"model.safetensors is truncated or changed ({size} bytes, the manifest says {size + 10})",)

    # the fallback loads and really is step 2
    resumed = Trainer(trainer.run_dir, seed=1)
    extra, state = load_checkpoint(resumed.accelerator, choice.path)
    assert state == {"step": 2, "global_batch": 8, "arch": "linear"}  # the format marker is not handed back
    assert torch.equal(extra["queue"], torch.arange(3.0) + 2)
    for key, value in resumed.weights().items():
        assert torch.equal(value, weights[2][key])


def test_explicit_checkpoint_that_fails_verification_is_an_error(run):
    trainer, folders, _ = run
    model_file = folders[4] / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"--resume .*step_0000004.*model\.safetensors is truncated"):
        find_checkpoint(trainer.run_dir, str(folders[4]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(Trainer(trainer.run_dir).accelerator, folders[4])
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find_checkpoint(trainer.run_dir, str(trainer.run_dir))


def test_changed_missing_and_unlisted_files_are_named(run):
    _, folders, _ = run
    opt = folders[4] / "optimizer.bin"
    data = bytearray(opt.read_bytes())
    data[-1] ^= 0xFF  # same size, different contents
    opt.write_bytes(bytes(data))
    (folders[4] / ckpt.EXTRA_STATE).unlink()
    (folders[4] / "custom_checkpoint_0.pkl").write_bytes(b"not from this save")
    (folders[4] / ".nfs0001").write_bytes(b"hidden files are ignored")
    problems = verify_checkpoint(folders[4]).problems
    assert problems == ("extra_state.safetensors is missing",
                        "optimizer.bin was changed (its sha256 differs from the manifest's)",
                        "custom_checkpoint_0.pkl is not listed in manifest.json")


def test_auto_with_every_checkpoint_damaged_is_an_error_not_a_fresh_start(run):
    trainer, folders, _ = run
    for folder in folders.values():
        (folder / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match=r"step_0000004 \(optimizer.bin is missing\).*"
                                              r"step_0000002 \(optimizer.bin is missing\)"):
        find_checkpoint(trainer.run_dir, "auto")


def test_no_checkpoints_means_none(tmp_path):
    with no_warnings():
        assert find_checkpoint(tmp_path / "fresh_run", "auto") is None


def test_latest_pointer_wins_and_newer_abandoned_folders_are_ignored(run):
    trainer, folders, _ = run
    (trainer.run_dir / "checkpoints" / "latest").write_text("step_0000002")
    with no_warnings():
        assert find_checkpoint(trainer.run_dir, "auto") == folders[2]
    (trainer.run_dir / "checkpoints" / "latest").unlink()  # no pointer: the highest step
    with no_warnings():
        assert find_checkpoint(trainer.run_dir, "auto") == folders[4]


def test_checkpoint_without_manifest_from_before_manifests_is_accepted_with_warning(run):
    trainer, folders, _ = run
    for folder in folders.values():  # make both look like the old format
        (folder / MANIFEST).unlink()
        state = json.loads((folder / TRAIN_STATE).read_text())
        del state[FORMAT_KEY]
        (folder / TRAIN_STATE).write_text(json.dumps(state))
    report = verify_checkpoint(folders[4])
    assert report.ok and report.legacy
    with pytest.warns(CheckpointWarning, match="step_0000004 has no manifest.json"):
        assert find_checkpoint(trainer.run_dir, "auto") == folders[4]
    with pytest.warns(CheckpointWarning, match="cannot be verified"):
        _, state = load_checkpoint(Trainer(trainer.run_dir).accelerator, folders[4])
    assert state["step"] == 4


# --------------------------------------------------------------------------------------------------
# RNG state


def test_resume_restores_random_streams_exactly(tmp_path):
    trainer = Trainer(tmp_path / "run")
    trainer.step()
    folder = trainer.save(2)
    expected = (torch.rand(3), random.random())

    resumed = Trainer(tmp_path / "run", seed=123)
    torch.rand(100)
    with no_warnings():
        load_checkpoint(resumed.accelerator, folder)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_accelerate_alone_swallows_a_bad_rng_file(run):
    """Why load_checkpoint checks: accelerate's load_state just logs and resumes with the wrong random state."""
    trainer, folders, _ = run
    (folders[4] / RNG).write_bytes(b"x" * (folders[4] / RNG).stat().st_size)
    Trainer(trainer.run_dir).accelerator.load_state(str(folders[4]))  # no error


def test_replaced_rng_file_is_named_by_the_manifest_check(run):
    trainer, folders, _ = run
    rng = folders[4] / RNG
    rng.write_bytes(b"x" * rng.stat().st_size)  # other bytes, same size
    with pytest.raises(CheckpointError, match=f"{RNG} was changed"):
        find_checkpoint(trainer.run_dir, str(folders[4]))
    with pytest.raises(CheckpointError, match=f"{RNG} was changed"):
        load_checkpoint(Trainer(trainer.run_dir).accelerator, folders[4])
    with pytest.warns(CheckpointWarning, match=f"step_0000004 \\({RNG} was changed"):
        assert find_checkpoint(trainer.run_dir, "auto") == folders[2]


def rewrite_manifest(folder: Path) -> None:
    """Make the manifest agree with the folder again, as if the bad file had been saved that way."""
    ckpt._write_manifest(folder, json.loads((folder / TRAIN_STATE).read_text())["step"])


class _Marker:
    ran = False


def _mark() -> None:
    _Marker.ran = True


class _Evil:
    def __reduce__(self):
        return (_mark, ())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content, reason", [
    (b"x" * 64, "cannot be loaded safely"),
    (pickle.dumps(_Evil()), "cannot be loaded safely"),  # code in a pickle is refused, never run
    (None, "lacks random_state"),
    ("missing", "is missing"),
], ids=["garbage", "pickled-code", "no-states", "missing"])
def test_unusable_rng_file_is_not_an_exact_resume(run, content, reason):
    trainer, folders, weights = run
    rng = folders[4] / RNG
    if content is None:
        torch.save({"step": 0, "note": torch.zeros(1)}, rng)  # a valid, safe file without the states
    elif content == "missing":
        rng.unlink()  # e.g. resuming with more processes than the checkpoint was written with
    else:
        rng.write_bytes(content)
    rewrite_manifest(folders[4])
    assert verify_checkpoint(folders[4]).ok

    with pytest.raises(InexactResumeError) as err:
        load_checkpoint(Trainer(trainer.run_dir).accelerator, folders[4])
    message = str(err.value)
    assert str(rng) in message and reason in message and "would not be exact" in message
    assert "allow_inexact=True" in message
    assert not _Marker.ran

    resumed = Trainer(trainer.run_dir)
    with pytest.warns(CheckpointWarning, match=f"would not be exact: .*{RNG}.*continuing anyway"):
        _, state = load_checkpoint(resumed.accelerator, folders[4], allow_inexact=True)
    assert state["step"] == 4
    for key, value in resumed.weights().items():  # everything but the RNG was still restored
        assert torch.equal(value, weights[4][key])
    assert not _Marker.ran


def test_rng_state_that_accelerate_fails_to_apply_is_caught(run, monkeypatch):
    """A file that reads fine but that load_state does not manage to apply is caught after the load."""
    trainer, folders, _ = run
    resumed = Trainer(trainer.run_dir)

    def broken(state: torch.Tensor) -> None:
        raise RuntimeError("simulated failure inside accelerate's load_state")

    monkeypatch.setattr(torch, "set_rng_state", broken)  # accelerate catches this and only logs it
    with pytest.raises(InexactResumeError, match=f"{RNG}: accelerate's load_state did not apply"):
        load_checkpoint(resumed.accelerator, folders[4])


# --------------------------------------------------------------------------------------------------
# resume compatibility


def test_compatible_resume_passes_silently():
    state = {"step": 8, "global_batch": 8, "arch": "resnet18", "sizes": [1, 2]}
    with no_warnings():
        check_resume_compatible(state, {"global_batch": 8, "arch": "resnet18", "sizes": (1, 2)}, "step_0000008")


def test_different_settings_name_each_key_and_both_values():
    state = {"step": 8, "global_batch": 8, "arch": "resnet18", "world_size": 2}
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(state, {"global_batch": 4, "arch": "resnet50", "world_size": 2},
                                Path("/runs/x/checkpoints/step_0000008"))
    message = str(err.value)
    assert message.startswith("checkpoint step_0000008 was written with global_batch=8, this run has 4 "
                              "(train.batch_size x processes); arch=resnet18, this run has resnet50 (model.arch)")
    assert "world_size" not in message
    assert message.endswith("resume with the same settings or start a new run")


def test_allowed_difference_warns_that_the_run_is_not_exact():
    state = {"global_batch": 8, "arch": "resnet18", "total_steps": 100}
    with pytest.warns(CheckpointWarning, match=r"total_steps=100, this run has 200 .*no longer an exact"):
        check_resume_compatible(state, {"global_batch": 8, "total_steps": 200}, "step_0000008",
                                allow={"total_steps"})
    with pytest.raises(CheckpointError, match="global_batch=8, this run has 16") as err, \
            pytest.warns(CheckpointWarning, match="total_steps"):
        check_resume_compatible(state, {"global_batch": 16, "total_steps": 200}, "step_0000008",
                                allow={"total_steps"})
    assert "total_steps" not in str(err.value)


def test_unrecorded_key_warns_and_custom_sources_are_used():
    with pytest.warns(CheckpointWarning, match="does not record image_size"):
        check_resume_compatible({"step": 1}, {"image_size": 473}, "step_0000001")
    with pytest.raises(CheckpointError, match=r"shot=1, this run has 5 \(data.shot\)"):
        check_resume_compatible({"shot": 1}, {"shot": 5}, "step_0000001", sources={"shot": "data.shot"})


def test_compatibility_against_a_real_checkpoint(run):
    trainer, folders, _ = run
    _, state = load_checkpoint(Trainer(trainer.run_dir).accelerator, find_checkpoint(trainer.run_dir, "auto"))
    check_resume_compatible(state, {"global_batch": 8, "arch": "linear"}, folders[4])
    with pytest.raises(CheckpointError, match="checkpoint step_0000004 was written with global_batch=8, this run "
                                              r"has 4 \(train.batch_size x processes\)"):
        check_resume_compatible(state, {"global_batch": 4, "arch": "linear"}, folders[4])


# --------------------------------------------------------------------------------------------------
# metrics log


def test_truncate_after_drops_rerun_steps(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 7):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"event": "eval", "miou": 0.5})  # no step: kept
    with log.path.open("a") as fh:
        fh.write('{"step": 7, "loss"')  # cut short by a kill
    before = log.path.read_text().splitlines()

    assert log.truncate_after(3) == 4  # steps 4, 5, 6 and the partial line
    after = log.path.read_text().splitlines()
    assert after == before[:3] + [before[6]]
    assert [json.loads(line).get("step") for line in after] == [1, 2, 3, None]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()

    log.write({"step": 4, "loss": 0.25})  # the resumed run appends after the kept rows
    assert [json.loads(line).get("step") for line in log.path.read_text().splitlines()] == [1, 2, 3, None, 4]


def test_truncate_after_is_a_no_op_when_nothing_to_drop(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.truncate_after(5) == 0  # no file yet
    assert not log.path.exists()
    log.write({"step": 1})
    text = log.path.read_text()
    assert log.truncate_after(5) == 0 and log.path.read_text() == text
    assert MetricsLog(log.path, enabled=False).truncate_after(0) == 0  # other ranks never touch the file
    assert log.path.read_text() == text
