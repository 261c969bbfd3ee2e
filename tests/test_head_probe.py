"""The generalization probe (finetune.tools.head_probe): its maps by hand, step 0 is the baseline, the ceiling is
labelled as one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_sources import write_fss

from finetune.tools.head_probe import ProbeHead, baseline_logits, episode_maps, main


def test_maps_by_hand_when_the_query_is_the_support():
    torch.manual_seed(0)
    taps = [torch.randn(2, c, 4, 4) for c in (32, 96, 320)]
    mask = torch.zeros(2, 25, 25, dtype=torch.long)
    mask[:, :13] = 1  # top half foreground: rows 0-1 of the 4x4 map (bilinear, align_corners) are 1, rows 2-3 < 1
    maps = episode_maps(taps, taps, mask)
    assert maps.shape == (2, 12, 4, 4)
    # every query pixel with foreground weight > 0 finds itself among the support's foreground pixels: cosine 1
    assert torch.allclose(maps[:, 2, :2], torch.ones(2, 2, 4), atol=1e-5)
    # prototype cosines are in [-1, 1] and the baseline's logits are 20 x (background, foreground) cosines
    assert maps[:, :2].abs().max() <= 1 + 1e-5
    logits = baseline_logits(taps, taps, mask)
    assert torch.allclose(logits, 20 * maps[:, 4:6].flip(1), atol=1e-4)
    assert torch.equal(ProbeHead(features=64)(taps, taps, mask), logits)  # zero-initialised last layer


def write_config(tmp_path: Path) -> Path:
    a = write_fss(tmp_path / "a", {"ant": 4, "bee": 4, "cup": 4, "dog": 4})
    b = write_fss(tmp_path / "b", {"fox": 4, "owl": 4, "elk": 4})
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"""
data:
  benchmark: multi
  eval_size: 25
  query_order: random
  val_classes: [bee]
  sources:
    - {{name: a, benchmark: fss1000, root: {a}, fss_classes: {{train: [ant, bee, dog], test: [cup]}}}}
    - {{name: b, benchmark: fss1000, root: {b}, fss_classes: {{train: [fox, owl], test: [elk]}}}}
model: {{backbone: mobilenet_v2, backbone_weights: random}}
train: {{episodes_per_epoch: 8, val_episodes: 6, seed: 0}}
eval: {{episodes: 6, seeds: [0, 1]}}
""")
    return cfg


def test_step_zero_is_the_baseline_and_the_ceiling_says_so(tmp_path, one_thread):
    cfg, out = write_config(tmp_path), tmp_path / "out"
    zero = main(["--config", str(cfg), "--out", str(out), "--steps", "0", "--epochs", "2"])
    assert zero["selected_step"] == 0 and zero["selected"] == zero["baseline"]
    assert set(zero["baseline"]) == {"a", "b", "mean"}
    trained = main(["--config", str(cfg), "--out", str(out), "--steps", "4", "--val-every", "2", "--batch", "2",
                    "--epochs", "2", "--sampling", "pairs", "--head", "maps"])
    assert trained["baseline"] == zero["baseline"]  # the same cached features and episodes
    assert [s for s, _ in trained["validation_curve"]] == [0, 2, 4]
    assert len(list(out.glob("features_*.pt"))) == 1  # the second call reused the cache
    ceiling = main(["--config", str(cfg), "--out", str(out), "--steps", "2", "--batch", "2", "--epochs", "1",
                    "--train-on", "test"])
    assert ceiling["ceiling_only"] is True
    assert "CEILING: trained on test classes" in (out / "results.md").read_text()
    saved = json.loads((out / f"{ceiling['label']}.json").read_text())
    assert saved["ceiling_only"] and saved["args"]["train_on"] == "test"
