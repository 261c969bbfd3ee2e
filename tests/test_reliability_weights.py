"""Reliability of weights, exports and resumes: bad ``model.init_weights`` fail before any data work, corrupt
exports / weights are named without a traceback by the probe and the stage-2 evaluation, the probe names the
layout it expects, and ``--allow-inexact-resume`` is an explicit opt-in. Every file is made in ``tmp_path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import common.checkpoint as ckpt
import pretrain.run as stage1_run
from common.checkpoint import TRAIN_STATE, CheckpointError, CheckpointWarning, InexactResumeError, save_checkpoint
from common.cli import parse_run_args, user_errors
from common.config import load_config
from common.errors import WeightsError
from common.run import resume_from
from pretrain.config import PretrainConfig
from pretrain.model import MoCoPrior
from pretrain.probe import main as probe_main

REPO_ROOT = Path(__file__).resolve().parents[1]
RANDOM_BYTES = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
FINETUNE_TINY = ["--config", str(REPO_ROOT / "configs" / "finetune" / "quickstart_cpu.yaml"),
                 "data.synthetic_per_class=4", "data.synthetic_size=48", "data.train_size=33", "data.eval_size=33",
                 "model.bins=[1.0,0.5]", "model.reduce_dim=8", "eval.episodes=2", "eval.seeds=[0]",
                 "eval.num_workers=0", "train.trackers=[]"]


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv("QGNET_DEBUG", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def corrupt(path: Path) -> Path:
    path.write_bytes(RANDOM_BYTES)
    return path


def mobilenet_export(path: Path) -> Path:
    """A stage-1-style export: torchvision names without the classifier, ``arch`` in the metadata."""
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.mobilenet_v2(weights=None).state_dict().items()
             if not k.startswith("classifier.")}
    save_file(state, str(path), metadata={"arch": "mobilenet_v2"})
    return path


def stage1_cfg(*extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["model.arch=resnet18", "model.head_hidden_dim=16", "model.out_dim=8",
                                              "model.split_bn_splits=2", "train.trackers=[]", *extra])


# --------------------------------------------------------------------------------------------------
# case 4: model.init_weights of stage 1


@pytest.mark.parametrize("name", ["random.pth", "random.safetensors", "missing.pth"])
def test_init_weights_that_cannot_be_read_name_the_key_and_the_file(tmp_path, name):
    path = tmp_path / name if name.startswith("missing") else corrupt(tmp_path / name)
    cfg = stage1_cfg(f"model.init_weights={path}")
    with pytest.raises(WeightsError) as info:
        MoCoPrior(cfg)
    message = str(info.value)
    assert message.startswith("model.init_weights: ") and str(path) in message
    assert ("not found" if name.startswith("missing") else "cannot be read as a state dict") in message
    with pytest.raises(WeightsError, match=rf"^model\.init_weights: .*{path.name}"):  # the early check
        stage1_run.check_init_weights(cfg)


def test_stage1_run_fails_on_bad_init_weights_before_the_image_scan(tmp_path, monkeypatch, capsys):
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("reached the run set-up / image scan with unreadable model.init_weights")

    monkeypatch.setattr(stage1_run, "start_run", must_not_run)
    monkeypatch.setattr(stage1_run, "prepare_images", must_not_run)
    monkeypatch.setattr(stage1_run, "train", must_not_run)
    bad = corrupt(tmp_path / "init.pth")
    argv = ["--config", str(stage1_run.QUICKSTART), f"model.init_weights={bad}", f"train.out_dir={tmp_path / 'runs'}",
            "train.trackers=[]"]
    with pytest.raises(WeightsError, match=rf"^model\.init_weights: {bad}: cannot be read"):
        stage1_run.main(argv)
    with pytest.raises(SystemExit) as exit_info:  # as `python pretrain/run.py` reports it
        with user_errors():
            stage1_run.main(argv[:3] + [f"model.init_weights={tmp_path / 'nowhere.pth'}"] + argv[4:])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.init_weights: weights file not found: ") and "nowhere.pth" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_readable_init_weights_pass_the_early_check(tmp_path):
    good = tmp_path / "init.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(good))
    stage1_run.check_init_weights(stage1_cfg(f"model.init_weights={good}"))  # reads, builds nothing
    stage1_run.check_init_weights(stage1_cfg())  # unset: nothing to read


# --------------------------------------------------------------------------------------------------
# cases 5 and 7: the probe and the stage-2 evaluation


def fss_folder(root: Path, classes: tuple[str, ...] = ("cup", "pen"), n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40), np.uint8)
    mask[8:30, 10:32] = 255
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
            Image.fromarray(mask).save(root / name / f"{i}.png")
    return root


def test_probe_names_a_corrupt_export_without_traceback(tmp_path, capsys):
    bad = corrupt(tmp_path / "prior.safetensors")
    assert probe_main([str(bad), "--data", str(fss_folder(tmp_path / "fss")), "--episodes", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and "safetensors" in err and "Traceback" not in err


def test_probe_on_a_flat_folder_names_it_and_the_expected_layout(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in (1, 2, 3):  # images straight in the folder, no class folders
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(flat / f"{i}.jpg")
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(flat / f"{i}.png")
    export = mobilenet_export(tmp_path / "prior.safetensors")
    assert probe_main([str(export), "--data", str(flat), "--episodes", "1", "--no-compare-random"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {flat}: ")
    assert "<class>/<n>.jpg + <n>.png" in err and "Traceback" not in err


def test_finetune_evaluate_names_corrupt_weights_without_traceback(tmp_path, capsys):
    import finetune.evaluate as stage2_eval

    (tmp_path / "run").mkdir()
    bad = corrupt(tmp_path / "run" / "best_model.safetensors")
    argv = [str(bad), *FINETUNE_TINY, f"data.root={tmp_path / 'data'}", "model.method=pfenet",
            f"eval.out_dir={tmp_path / 'eval'}"]
    with pytest.raises(WeightsError, match=rf"{bad}: cannot be read as a state dict"):
        stage2_eval.main(list(argv))
    with pytest.raises(SystemExit) as exit_info:  # what `python -m finetune.evaluate` does with it
        with user_errors():
            stage2_eval.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: cannot be read as a state dict" in err and "Traceback" not in err


def test_finetune_evaluate_command_names_a_corrupt_prior_without_traceback(tmp_path):
    bad = corrupt(tmp_path / "prior.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("QGNET_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "finetune.evaluate", *FINETUNE_TINY,
                           f"data.root={tmp_path / 'data'}", f"model.prior={bad}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and str(bad) in done.stderr


# --------------------------------------------------------------------------------------------------
# case 8: --allow-inexact-resume


def test_allow_inexact_resume_flag_is_parsed_and_needs_resume(capsys):
    inv = parse_run_args(PretrainConfig, ["--resume", "--allow-inexact-resume", "train.trackers=[]"], prog="p")
    assert inv.resume == "auto" and inv.allow_inexact is True
    inv = parse_run_args(PretrainConfig, ["--resume", "/some/ckpt", "train.trackers=[]"], prog="p")
    assert inv.resume == "/some/ckpt" and inv.allow_inexact is False
    with pytest.raises(SystemExit) as exit_info:
        parse_run_args(PretrainConfig, ["--allow-inexact-resume", "train.trackers=[]"], prog="p")
    assert exit_info.value.code == 2
    assert "--allow-inexact-resume only applies with --resume" in capsys.readouterr().err


def linear_run(run_dir: Path) -> tuple[Accelerator, Path, dict[str, torch.Tensor]]:
    """A prepared nn.Linear + SGD with one checkpoint at step 2 (global batch 8, arch 'linear')."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    folder = save_checkpoint(accelerator, run_dir, 2, {"queue": torch.arange(3.0)},
                             {"step": 2, "global_batch": 8, "arch": "linear"}, keep_last=0)
    weights = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return accelerator, folder, weights


def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path, capsys):
    accelerator, folder, _ = linear_run(tmp_path / "run")
    expected = {"global_batch": 16, "arch": "linear"}
    with pytest.raises(CheckpointError, match=r"global_batch=8, this run has 16 .*--allow-inexact-resume"):
        resume_from(accelerator, tmp_path / "run", "auto", expected)
    capsys.readouterr()
    with pytest.warns(CheckpointWarning, match="global_batch=8, this run has 16.*no longer an exact continuation"):
        resumed = resume_from(accelerator, tmp_path / "run", "auto", expected, allow_inexact=True)
    assert resumed.step == 2 and resumed.checkpoint == folder and torch.equal(resumed.extra["queue"], torch.arange(3.0))
    out = capsys.readouterr().out
    assert f"resumed from {folder} at step 2" in out
    assert "--allow-inexact-resume: accepted: " in out and "no longer an exact continuation" in out


def test_same_settings_resume_exactly_with_or_without_the_flag(tmp_path, capsys):
    accelerator, folder, _ = linear_run(tmp_path / "run")
    expected = {"global_batch": 8, "arch": "linear"}
    assert resume_from(accelerator, tmp_path / "run", "auto", expected).step == 2  # the engines' call, unchanged
    assert resume_from(accelerator, tmp_path / "run", "auto", expected, allow_inexact=True).step == 2
    assert "matched this run's settings and RNG state; it continues exactly" in capsys.readouterr().out
    assert resume_from(accelerator, tmp_path / "run", None, expected, allow_inexact=True).step == 0


def test_unusable_rng_state_is_refused_unless_allowed(tmp_path, capsys):
    accelerator, folder, _ = linear_run(tmp_path / "run")
    (folder / ckpt.RNG_STATE.format(rank=0)).write_bytes(b"x" * 64)
    ckpt._write_manifest(folder, 2)  # as if it had been saved that way: the manifest check passes
    expected = {"global_batch": 8, "arch": "linear"}
    with pytest.raises(InexactResumeError, match=r"would not be exact: .*random_states_0\.pkl.*--allow-inexact-resume"):
        resume_from(accelerator, tmp_path / "run", "auto", expected)
    with pytest.warns(CheckpointWarning, match="would not be exact"):
        resumed = resume_from(accelerator, tmp_path / "run", str(folder), expected, allow_inexact=True)
    assert resumed.step == 2
    assert "no longer an exact continuation" in capsys.readouterr().out


def test_a_damaged_checkpoint_is_not_lifted_by_the_flag(tmp_path):
    accelerator, folder, _ = linear_run(tmp_path / "run")
    state = (folder / TRAIN_STATE).read_text()
    (folder / TRAIN_STATE).write_text(state.replace('"step": 2', '"step": 3'))  # changed after the manifest
    with pytest.raises(CheckpointError, match="failed verification"):
        resume_from(accelerator, tmp_path / "run", str(folder), {"global_batch": 8}, allow_inexact=True)
