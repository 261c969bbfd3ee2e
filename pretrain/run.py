"""Stage-1 entry point: pretrain the prior extractor, then export it.

    accelerate launch pretrain/run.py                                  # CPU quick-start on built-in photos
    accelerate launch pretrain/run.py --config configs/pretrain/X.yaml key.sub=value ... [--resume [auto|DIR]]

The same command runs on 1 CPU process, N CPU processes (gloo), one GPU or many GPUs / nodes: how many and
where is the launcher's business (see launch/). This file builds the one Accelerator of the run and wires
config -> data -> model -> engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pretrain/run.py` puts pretrain/ first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from common.cli import parse_run_args  # noqa: E402
from common.config import dump_yaml, save_config  # noqa: E402
from common.runlog import run_header  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import prepare_images  # noqa: E402
from pretrain.engine import train  # noqa: E402
from pretrain.export import export_prior  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "pretrain" / "quickstart_cpu.yaml"


def main(argv: list[str] | None = None) -> Path | None:
    inv = parse_run_args(PretrainConfig, argv, prog="accelerate launch pretrain/run.py",
                         default_config=QUICKSTART, description=__doc__)
    cfg = inv.cfg
    run_name = cfg.train.run_name or (Path(inv.config_path).stem if inv.config_path else "default")
    run_dir = Path(cfg.train.out_dir) / run_name
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not (cfg.uses_global and cfg.uses_local))
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(run_dir), kwargs_handlers=[ddp])
    set_seed(cfg.train.seed)  # same on every rank: both encoders and heads start identical everywhere

    cache_dir = Path(cfg.superpixels.cache_dir or Path(cfg.train.out_dir) / "superpixel_cache")
    image_list = run_dir / "images.txt"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        accelerator.print(run_header("stage 1: prior-extractor pretraining", {
            "config": inv.config_path or "<schema defaults>", "run dir": run_dir,
            "processes": accelerator.num_processes, "device": accelerator.device,
            "mixed precision": accelerator.mixed_precision}))
        accelerator.print(dump_yaml(cfg))
        report = prepare_images(cfg, Path(cfg.train.out_dir), cache_dir)
        image_list.write_text("".join(f"{p}\n" for p in report.good))
        if report.bad:
            (run_dir / "bad_images.txt").write_text("".join(f"{p}\t{why}\n" for p, why in report.bad))
            accelerator.print(f"left out {len(report.bad)} bad images (listed in {run_dir / 'bad_images.txt'})")
        accelerator.print(f"{len(report.good)} images ready")
    accelerator.wait_for_everyone()
    image_paths = [Path(line) for line in image_list.read_text().splitlines()]

    result = train(cfg, accelerator, run_dir, image_paths, cache_dir, resume=inv.resume)

    if accelerator.is_main_process and result.checkpoint is not None:
        accelerator.print(f"checkpoint:       {result.checkpoint}")
        accelerator.print(f"tensorboard logs: {run_dir / 'pretrain'}  (tensorboard --logdir {run_dir})")
        if cfg.train.export_at_end:
            st, pth = export_prior(result.checkpoint, run_dir / f"prior_{cfg.model.arch}.safetensors", "key")
            accelerator.print(f"exported prior:   {st}\n                  {pth}")
    accelerator.end_training()  # closes the trackers and, with several processes, the process group
    return result.checkpoint


if __name__ == "__main__":
    main()
