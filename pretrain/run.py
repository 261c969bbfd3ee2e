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

from accelerate import DistributedDataParallelKwargs  # noqa: E402

from common.cli import parse_run_args, user_errors  # noqa: E402
from common.io import write_text  # noqa: E402
from common.run import start_run  # noqa: E402
from common.weights import load_state_dict_file  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import prepare_images, save_superpixel_grid  # noqa: E402
from pretrain.engine import train  # noqa: E402
from pretrain.export import export_prior  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "configs" / "pretrain" / "quickstart_cpu.yaml"


def check_init_weights(cfg: PretrainConfig) -> None:
    """Read ``model.init_weights`` once, when set, so that a missing or unreadable file is reported at once.

    Only the file is read (no network is built, no random number drawn); whether it fits the architecture is
    checked when the model is created.

    Raises:
        WeightsError: naming ``model.init_weights`` and the file.
    """
    if cfg.model.init_weights:
        load_state_dict_file(cfg.model.init_weights, key="model.init_weights")


def main(argv: list[str] | None = None) -> Path | None:
    """Run stage 1 from the command line (``argv`` without the program name); returns the last checkpoint."""
    inv = parse_run_args(PretrainConfig, argv, prog="accelerate launch pretrain/run.py",
                         default_config=QUICKSTART, description=__doc__)
    cfg = inv.cfg
    check_init_weights(cfg)  # a bad file must fail now, not after the image scan and the superpixel pass
    run_name = cfg.train.run_name or (Path(inv.config_path).stem if inv.config_path else "default")
    run_dir = Path(cfg.train.out_dir) / run_name
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not (cfg.uses_global and cfg.uses_local))
    precision = None if cfg.train.mixed_precision == "launcher" else cfg.train.mixed_precision
    # same seed on every rank: both encoders and heads start identical everywhere
    accelerator = start_run(cfg, "stage 1: prior-extractor pretraining", run_dir, inv.config_path, cfg.train.seed,
                            cfg.train.deterministic, cfg.train.trackers, kwargs_handlers=[ddp],
                            mixed_precision=precision)

    cache_dir = Path(cfg.superpixels.cache_dir or Path(cfg.train.out_dir) / "superpixel_cache")
    image_list = run_dir / "images.txt"
    if accelerator.is_main_process:
        report = prepare_images(cfg, Path(cfg.train.out_dir), cache_dir)
        write_text(image_list, "".join(f"{p}\n" for p in report.good))
        if report.bad:
            write_text(run_dir / "bad_images.txt", "".join(f"{p}\t{why}\n" for p, why in report.bad))
            accelerator.print(f"left out {len(report.bad)} bad images (listed in {run_dir / 'bad_images.txt'})")
        accelerator.print(f"{len(report.good)} images ready")
        if cfg.uses_local:  # what the local loss will see: the first images with their superpixel boundaries
            grid = save_superpixel_grid(report.good[:8], cfg, cache_dir, run_dir / "superpixels.png")
            accelerator.print(f"superpixels of the first images: {grid}")
    accelerator.wait_for_everyone()
    image_paths = [Path(line) for line in image_list.read_text().splitlines()]

    result = train(cfg, accelerator, run_dir, image_paths, cache_dir, resume=inv.resume,
                   allow_inexact=inv.allow_inexact)

    if accelerator.is_main_process and result.checkpoint is not None:
        accelerator.print(f"checkpoint:       {result.checkpoint}")
        accelerator.print(f"tensorboard logs: {run_dir / 'pretrain'}  (tensorboard --logdir {run_dir})")
        if cfg.train.export_at_end:
            st, pth = export_prior(result.checkpoint, run_dir / f"prior_{cfg.model.arch}.safetensors", "key")
            accelerator.print(f"exported prior:   {st}\n                  {pth}")
    accelerator.end_training()  # closes the trackers and, with several processes, the process group
    return result.checkpoint


if __name__ == "__main__":
    with user_errors():
        main()
