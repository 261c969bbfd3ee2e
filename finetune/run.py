"""Stage-2 entry point: train the configured few-shot method for one fold and shot, then evaluate it.

    accelerate launch finetune/run.py          # quick-start: continues stage 1's quick-start on generated data
    accelerate launch finetune/run.py --config configs/finetune/pascal5i_r50.yaml data.fold=0 shot=1 \
        model.prior=prior_r50.safetensors [--resume [auto|DIR]]
    accelerate launch finetune/run.py --config FILE model.method=prototype   # training-free: evaluation only
    accelerate launch finetune/run.py --config FILE train.stage=base         # BAM's base learner (no evaluation)

After training, the weights chosen on the validation split of the training classes (the last weights when the
benchmark has no validation split) are evaluated with the fixed protocol on the fold's test classes. Every
split the run will use is indexed and checked before the first training step.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch finetune/run.py` puts finetune/ first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.cli import parse_run_args, user_errors  # noqa: E402
from common.run import start_run  # noqa: E402
from fewshot.data.sources import build_splits  # noqa: E402
from fewshot.evaluate import check_episodes  # noqa: E402
from finetune.base_stage import run_base_stage  # noqa: E402
from finetune.config import FinetuneConfig, eval_spec  # noqa: E402
from finetune.engine import LAST, train  # noqa: E402
from finetune.evaluate import check_eval_splits, eval_benchmarks, evaluate_all, init_weights, resolve_weights  # noqa: E402
from finetune.methods import build_method  # noqa: E402
from finetune.model.text_guidance import check_text_classes  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "finetune" / "quickstart_cpu.yaml"


def main(argv: list[str] | None = None) -> dict:
    inv = parse_run_args(FinetuneConfig, argv, prog="accelerate launch finetune/run.py",
                         default_config=QUICKSTART, description=__doc__)
    cfg = inv.cfg
    stem = Path(inv.config_path).stem if inv.config_path else "default"
    run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or f"{stem}_fold{cfg.data.fold}_{cfg.shot}shot")
    accelerator = start_run(cfg, "stage 2: few-shot segmenter", run_dir, inv.config_path, cfg.train.seed,
                            cfg.train.deterministic, cfg.train.trackers, header={"method": cfg.model.method})
    if cfg.train.stage == "base":  # BAM's base learner: a semantic segmenter, trained by the same loop
        result = run_base_stage(cfg, accelerator, run_dir, inv.resume, inv.allow_inexact)
        accelerator.end_training()
        return result

    model = build_method(cfg.model)
    if cfg.model.init_from:
        kept = init_weights(model, resolve_weights(cfg.model.init_from))
        accelerator.print(f"initialised from {cfg.model.init_from}; {len(kept)} tensors keep their initialisation"
                          + (f" ({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})" if kept else ""))
    # every split the run will use is indexed, checked for class overlaps and (test) read now, not after training
    splits = build_splits(cfg.data, need_train=model.trains, need_val=model.trains and cfg.train.val_every > 0)
    test_sets = eval_benchmarks(cfg, splits)
    check_eval_splits(cfg, test_sets)
    check_text_classes(model, [splits.train, splits.val, *test_sets.values()])
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir / "eval"
    if not model.trains:
        accelerator.print(f"{cfg.model.method} is training-free: evaluating it directly")
        results = evaluate_all(cfg, accelerator, model, test_sets, out_dir, checkpoint="none (training-free)")
        accelerator.end_training()
        return results

    val_set = splits.val if cfg.train.val_every else None
    if val_set is not None and cfg.train.task == "fss":  # the validation episodes are read now too
        check_episodes(val_set, dataclasses.replace(eval_spec(cfg), episodes=cfg.train.val_episodes, shot=cfg.shot),
                       [cfg.train.seed])
    n_train = sum(p.numel() for p in model.trainable_parameters())
    n_all = sum(p.numel() for p in model.parameters())
    accelerator.print(f"train: {splits.train}\nval: {val_set}\ntest: {', '.join(map(repr, test_sets.values()))}\n"
                      f"parameters: {n_train:,} trained of {n_all:,}")
    result = train(cfg, accelerator, model, run_dir, splits.train, val_set, inv.resume, inv.allow_inexact)

    weights = result.best_weights or run_dir / LAST
    accelerator.print(f"checkpoint: {result.checkpoint}\nweights evaluated: {weights}"
                      + (f" (best validation mIoU {100 * result.best_val_miou:.2f})" if result.best_weights else ""))
    accelerator.print(f"tensorboard logs: {run_dir / 'finetune'}  (tensorboard --logdir {run_dir})")
    results = evaluate_all(cfg, accelerator, model, test_sets, out_dir, checkpoint=str(weights), weights=weights)
    accelerator.end_training()  # closes the trackers and, with several processes, the process group
    return results


if __name__ == "__main__":
    with user_errors():
        main()
