"""Stage 1 through the real launcher: `accelerate launch pretrain/run.py`, 1 and 2 processes, kill + resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from killing import kill_after_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from common.config import load_config
from common.weights import trunk_features
from pretrain.config import PretrainConfig
from pretrain.data import materialise_builtin
from pretrain.model import MoCoPrior

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """Built-in photos and their superpixel cache, made once for every run in this module."""
    root = tmp_path_factory.mktemp("stage1")
    materialise_builtin(root / "images")
    return root


def tiny_overrides(shared_dirs: Path, out_dir: Path, *extra: str) -> list[str]:
    return [f"data.builtin_dir={shared_dirs / 'images'}", "data.num_workers=0",
            f"superpixels.cache_dir={shared_dirs / 'sp'}", "superpixels.max_side=128", "superpixels.workers=0",
            "aug.global_size=32", "aug.local_size=32", "model.arch=resnet18", "model.head_hidden_dim=64",
            "model.out_dim=16", "model.split_bn_splits=2", "queue.global_size=40", "queue.local_size=24",
            "train.batch_size=4", "train.log_every=1", f"train.out_dir={out_dir}", "train.run_name=run", *extra]


def launch(args: list[str], processes: int = 1, timeout: int = 300, wait: bool = True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = ACCELERATE + ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no"]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = ACCELERATE + ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    cmd += [str(REPO / "pretrain" / "run.py"), "--config", str(REPO / "configs/pretrain/quickstart_cpu.yaml"), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_end_to_end_through_accelerate_launch(shared_dirs, tmp_path):
    proc = launch(tiny_overrides(shared_dirs, tmp_path, "train.max_steps=3", "train.checkpoint_every=2"))
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    ckpt = run / "checkpoints" / "step_0000003"
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert {"model.safetensors", "optimizer.bin", "extra_state.safetensors", "train_state.json"} <= \
        {p.name for p in ckpt.iterdir()}
    assert list((run / "pretrain").rglob("events.out.tfevents.*")), "no TensorBoard events"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss/global", "loss/local", "lr", "momentum", "queue/global_fill", "queue/local_fill",
            "throughput/images_per_s"} <= set(records[-1])
    assert records[-1]["queue/global_fill"] == pytest.approx(12 / 40)  # 3 steps x 4 keys
    export = run / "prior_resnet18.safetensors"
    assert export.is_file() and "exported prior" in proc.stdout
    assert len(list(run.glob("prior_resnet18-*.pth"))) == 1

    # the export is a plain torchvision ResNet-18 minus fc, equal to the trained key encoder
    state = load_file(str(export))
    with safe_open(str(export), "pt") as fh:
        assert fh.metadata()["arch"] == "resnet18" and fh.metadata()["encoder"] == "key"
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    cfg = load_config(PretrainConfig, run / "config.yaml")
    model = MoCoPrior(cfg)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    model.eval(), net.eval()
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net(x), trunk_features(model.key_encoder, x).mean((2, 3)), rtol=1e-5, atol=1e-5)
    pth = next(run.glob("prior_resnet18-*.pth"))
    for k, v in torch.load(pth, weights_only=True).items():
        assert torch.equal(v, state[k])


@pytest.mark.slow
def test_pooled_mode_and_export_cli(shared_dirs, tmp_path):
    launch(tiny_overrides(shared_dirs, tmp_path, "train.max_steps=2", "loss.local_mode=pooled",
                          "loss.pooled_regions=2", "aug.global_size=64", "train.export_at_end=false"))
    out = tmp_path / "q.safetensors"
    subprocess.run([sys.executable, "-m", "pretrain.export", str(tmp_path / "run"), "--out", str(out),
                    "--encoder", "query"], check=True, capture_output=True)
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["encoder"] == "query"


@pytest.mark.slow
def test_two_process_gloo_ranks_hold_identical_queues(shared_dirs, tmp_path):
    launch(tiny_overrides(shared_dirs, tmp_path, "train.max_steps=3", "train.export_at_end=false"), processes=2)
    state = json.loads((tmp_path / "run/checkpoints/step_0000003/train_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 8
    digests = state["queue_digests_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    extra = load_file(str(tmp_path / "run/checkpoints/step_0000003/extra_state.safetensors"))
    assert int(extra["queue.global.ptr"]) == (3 * 8) % 40  # keys of both ranks were enqueued


@pytest.mark.slow
@pytest.mark.parametrize("views", [[], ["data.augment_on=device", "loss.local_mode=pooled", "data.canvas_side=128"]],
                         ids=["worker", "device-pooled"])
def test_kill_and_resume_equals_uninterrupted_run(shared_dirs, tmp_path, views):
    common = ["train.max_steps=8", "train.checkpoint_every=2", "train.deterministic=true",
              "train.export_at_end=false", "train.keep_last=0", *views]
    launch(tiny_overrides(shared_dirs, tmp_path / "a", *common))

    killed = launch(tiny_overrides(shared_dirs, tmp_path / "b", *common), wait=False)
    kill_after_checkpoint(killed, tmp_path / "b/run/checkpoints/latest", "step_0000002")
    assert not (tmp_path / "b/run/checkpoints/step_0000008").exists()
    launch(tiny_overrides(shared_dirs, tmp_path / "b", *common) + ["--resume", "auto"])

    final_a, final_b = (tmp_path / p / "run/checkpoints/step_0000008" for p in ("a", "b"))
    for name in ("model.safetensors", "extra_state.safetensors"):
        a, b = load_file(str(final_a / name)), load_file(str(final_b / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    # the mode is recorded, so a resume in the other mode is refused rather than silently continued
    state = json.loads((final_b / "train_state.json").read_text())
    assert state["augment_on"] == ("device" if views else "worker")
