"""``eval.batch_size`` is speed only: episodes batched several to a forward score exactly as one at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator

from common.config import load_config
from fewshot.data.synthetic import SyntheticFss
from fewshot.evaluate import EvalSpec, evaluate
from finetune.config import FinetuneConfig
from finetune.methods import build_method


@pytest.mark.parametrize("protocol", ["pfenet", "hsnet"])
@pytest.mark.parametrize("method", ["prototype", "qgnet"])
def test_batched_evaluation_gives_the_numbers_of_one_episode_per_forward(tmp_path_factory, method, protocol):
    bench = SyntheticFss(tmp_path_factory.getbasetemp() / "eval_batch_data", split="test", per_class=4, size=48)
    cfg = load_config(FinetuneConfig, None, [
        f"model.method={method}", "model.backbone=mobilenet_v2", "model.backbone_weights=random",
        "model.prior=random", "model.prior_arch=resnet18", "model.reduce_dim=8", "model.bins=[1.0,0.5]"])
    torch.manual_seed(0)
    model = build_method(cfg.model)
    single = EvalSpec(shot=2, episodes=7, protocol=protocol, size=33)
    results = [evaluate(model, bench, dataclasses.replace(single, batch_size=b), 0, Accelerator(cpu=True))
               for b in (1, 3)]  # 7 episodes: batches of 3, 3 and 1
    one, batched = (r["meter"] for r in results)
    assert one["episodes"] == batched["episodes"] == 7
    assert results[0]["episodes_hash"] == results[1]["episodes_hash"]
    assert batched["miou"] == pytest.approx(one["miou"], abs=1e-6)
    assert batched["fbiou"] == pytest.approx(one["fbiou"], abs=1e-6)
    assert batched["per_class_iou"] == pytest.approx(one["per_class_iou"], abs=1e-6)
