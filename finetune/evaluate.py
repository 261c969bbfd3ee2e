"""Evaluate a trained segmenter with the fixed protocol; results as JSON + markdown, episodes as PNG grids.

    python -m finetune.evaluate RUN_DIR_or_WEIGHTS [--config FILE] [key.sub=value ...]
    accelerate launch -m finetune.evaluate RUN_DIR ...            # episodes sharded over processes

RUN_DIR uses its ``best_model.safetensors`` (chosen on the validation split of the training classes) or, if the
run had no validation, ``last_model.safetensors``; its ``config.yaml`` is the default config. Typical overrides:
``data.fold=0 eval.shot=5 eval.seeds=[321,322,323] eval.episodes=5000 eval.protocol=hsnet``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from common.cli import parse_run_args
from common.config import save_config
from finetune.config import FinetuneConfig
from finetune.data.registry import build_benchmark
from finetune.engine import BEST, evaluate_seeds
from finetune.model.qgnet import QGNet, build_qgnet


def resolve_weights(source: str | Path) -> Path:
    """A weights file, or the best (else last) weights of a run folder."""
    source = Path(source)
    if source.is_file():
        return source
    for name in (BEST, "last_model.safetensors"):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"{source}: neither a .safetensors weights file nor a run folder with {BEST} or "
                            "last_model.safetensors")


def load_model(cfg: FinetuneConfig, weights: Path) -> QGNet:
    """Build the model from ``cfg.model`` and load trained weights (safetensors: no pickled code runs)."""
    model = build_qgnet(cfg.model)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit model.* of the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]} (check model.backbone / model.prior)")
    return model


def run_evaluation(cfg: FinetuneConfig, accelerator: Accelerator, weights: Path, out_dir: Path) -> dict:
    """Evaluate ``weights`` on the configured split with every seed; returns the results dict."""
    model = load_model(cfg, weights).to(accelerator.device)
    benchmark = build_benchmark(cfg.data, cfg.eval.split)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    results = evaluate_seeds(model, cfg, accelerator, benchmark, out_dir, str(weights))
    n = len(results["seeds"])
    accelerator.print(f"{cfg.data.benchmark} fold {cfg.data.fold} {results['shot']}-shot ({results['protocol']}, "
                      f"{results['episodes']} episodes x {n} seeds): mIoU {100 * results['miou_mean']:.2f}"
                      + (f" ± {100 * results['miou_std']:.2f}" if n > 1 else "")
                      + f", FB-IoU {100 * results['fbiou_mean']:.2f}")
    accelerator.print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}; "
                      f"pictures: {out_dir}/grid_*.png")
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m finetune.evaluate RUN_DIR_or_WEIGHTS [--config FILE] [key=value ...]")
    source, rest = Path(argv[0]), argv[1:]
    default_config = source / "config.yaml" if source.is_dir() else None
    inv = parse_run_args(FinetuneConfig, rest, prog="python -m finetune.evaluate", default_config=default_config,
                         description=__doc__)
    cfg = inv.cfg
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    accelerator = Accelerator()
    weights = resolve_weights(source)
    run_dir = source if source.is_dir() else weights.parent
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir / "eval"
    results = run_evaluation(cfg, accelerator, weights, out_dir)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
