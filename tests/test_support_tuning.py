"""Test-time support tuning: tunes on the supports only, leaves the model unchanged after the episode,
is deterministic, and is recorded in the results."""

from __future__ import annotations

import json

import pytest
import torch
from test_methods import model_cfg, tiny

from finetune.methods import build_method
from finetune.support_tuning import SupportTuned


def episode(seed: int = 0, shots: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 33, 33, generator=g), torch.randn(1, shots, 3, 33, 33, generator=g),
            torch.randint(0, 2, (1, shots, 33, 33), generator=g))


@pytest.mark.parametrize("shots", [1, 3])
def test_tuning_changes_the_answer_and_restores_every_parameter(shots):
    torch.manual_seed(0)
    model = build_method(model_cfg("method=pfenet")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    query, supports, masks = episode(shots=shots)
    with torch.no_grad():
        plain = model(query, supports, masks).logits
        tuned = SupportTuned(model, steps=3, lr=1e-2)(query, supports, masks).logits
    assert not torch.allclose(plain, tuned)  # the steps did something
    for k, v in model.state_dict().items():  # ... and left nothing behind
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with torch.no_grad():
        again = SupportTuned(model, steps=3, lr=1e-2)(query, supports, masks).logits
    torch.testing.assert_close(again, tuned, rtol=0, atol=0)  # deterministic


def test_tuning_a_training_free_method_is_an_error():
    with pytest.raises(ValueError, match="no trainable parameter"):
        SupportTuned(build_method(model_cfg("method=prototype")), steps=2)


def test_results_record_the_tuning(tmp_path):
    from finetune.evaluate import main as evaluate_main
    from finetune.run import main as run_main

    run_main(tiny(tmp_path / "data", tmp_path, "model.prior=none", "train.max_steps=1", "train.val_every=0",
                  "eval.episodes=2"))
    out = evaluate_main([str(tmp_path / "run"), "eval.support_tuning=2", f"eval.out_dir={tmp_path / 'tuned'}",
                         "eval.vis_episodes=0", "eval.episodes=2"])
    assert out["support_tuning"] == 2
    baseline = json.loads((tmp_path / "tuned/vs_prototype/results.json").read_text())
    assert "support_tuning" not in baseline  # the training-free baseline is never tuned


def test_tuning_fs_cs_episodes_is_a_config_error():
    from common.config import ConfigError, load_config
    from finetune.config import FinetuneConfig

    with pytest.raises(ConfigError, match="eval.support_tuning is an FS-S option"):
        load_config(FinetuneConfig, None, ["eval.task=fscs", "eval.support_tuning=2"])
