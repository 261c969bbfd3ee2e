"""Stage-2 entry point: train the few-shot segmenter for one fold and shot, then evaluate it.

    accelerate launch finetune/run.py          # quick-start: continues stage 1's quick-start on generated data
    accelerate launch finetune/run.py --config configs/finetune/pascal5i_r50.yaml data.fold=0 shot=1 \
        model.prior=prior_r50.safetensors [--resume [auto|DIR]]

After training, the weights chosen on the validation split of the training classes (the last weights when the
benchmark has no validation split) are evaluated with the fixed protocol on the fold's test classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch finetune/run.py` puts finetune/ first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from common.cli import parse_run_args  # noqa: E402
from common.config import dump_yaml, save_config  # noqa: E402
from common.runlog import run_header  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.data.registry import build_benchmark  # noqa: E402
from finetune.engine import train  # noqa: E402
from finetune.evaluate import run_evaluation  # noqa: E402
from finetune.model.qgnet import build_qgnet  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "finetune" / "quickstart_cpu.yaml"


def main(argv: list[str] | None = None) -> dict:
    inv = parse_run_args(FinetuneConfig, argv, prog="accelerate launch finetune/run.py",
                         default_config=QUICKSTART, description=__doc__)
    cfg = inv.cfg
    stem = Path(inv.config_path).stem if inv.config_path else "default"
    run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or f"{stem}_fold{cfg.data.fold}_{cfg.shot}shot")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(run_dir))
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        accelerator.print(run_header("stage 2: few-shot segmenter", {
            "config": inv.config_path or "<schema defaults>", "run dir": run_dir,
            "processes": accelerator.num_processes, "device": accelerator.device}))
        accelerator.print(dump_yaml(cfg))

    train_set = build_benchmark(cfg.data, "train")
    val_set = build_benchmark(cfg.data, "val") if cfg.train.val_every else None
    if val_set is not None and not val_set.class_ids:
        val_set = None
    model = build_qgnet(cfg.model)
    n_train = sum(p.numel() for p in model.trainable_parameters())
    n_all = sum(p.numel() for p in model.parameters())
    accelerator.print(f"train: {train_set}\nval: {val_set}\nparameters: {n_train:,} trained of {n_all:,}")
    result = train(cfg, accelerator, model, run_dir, train_set, val_set, inv.resume)

    weights = result.best_weights or run_dir / "last_model.safetensors"
    accelerator.print(f"checkpoint: {result.checkpoint}\nweights evaluated: {weights}"
                      + (f" (best validation mIoU {100 * result.best_val_miou:.2f})" if result.best_weights else ""))
    accelerator.print(f"tensorboard logs: {run_dir / 'finetune'}  (tensorboard --logdir {run_dir})")
    results = run_evaluation(cfg, accelerator, weights, Path(cfg.eval.out_dir) if cfg.eval.out_dir
                             else run_dir / "eval")
    accelerator.end_training()  # closes the trackers and, with several processes, the process group
    return results


if __name__ == "__main__":
    main()
