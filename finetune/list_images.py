"""Write the image files of a stage-2 config's split, one per line: stage 1's unlabeled training set.

    python -m finetune.list_images --config configs/finetune/smoke_real-mix_mnv2.yaml --out runs/data/train.txt
    accelerate launch pretrain/run.py --config configs/pretrain/mnv2_real-mix_cpu.yaml

Only the ``train`` split by default: the prior then sees no validation or test image, not even unlabeled, so the
comparison with ``prior: none`` on the test classes stays clean. Paths are written relative to ``--root``
(default: the filesystem root, i.e. absolute paths without the leading ``/``), the layout stage 1's
``data.source: folder`` + ``data.list_file`` reads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common.cli import user_errors
from common.config import load_config
from common.io import write_text
from fewshot.data.sources import build_splits
from finetune.config import FinetuneConfig


def split_images(cfg: FinetuneConfig, split: str = "train") -> list[Path]:
    """Every image file of ``split`` (``train`` or ``test``; all sources), sorted, each once."""
    splits = build_splits(cfg.data, need_train=split == "train", need_val=False)
    benches = [splits.train] if split == "train" else list(splits.test.values())
    paths = {Path(s.image_path) for b in benches if b is not None
             for c in b.class_ids for s in b.samples_by_class.get(c, [])}
    return sorted(paths)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m finetune.list_images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a stage-2 config (its data.* section is read)")
    parser.add_argument("--out", required=True, help="the list file to write")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--root", default="/", help="write paths relative to this folder")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)
    with user_errors():
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        paths = split_images(cfg, args.split)
        root = Path(args.root).resolve()
        lines = [os.path.relpath(p.resolve(), root) for p in paths]
        write_text(Path(args.out), "".join(line + "\n" for line in lines))
    print(f"{len(paths)} {args.split} images of {args.config} -> {args.out} (relative to {root})")
    return paths


if __name__ == "__main__":
    main()
