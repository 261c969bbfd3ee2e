"""FS-CS for the stage-2 runs: the iFSL training objectives, the engine's FS-CS step, and evaluation glue.

The protocol (episodes, inference rule, metrics, results) is :mod:`fewshot.fscs`; this module connects it to the
config (``eval.task=fscs``, ``eval.way``, ``train.task=fscs``, ``train.labels``) and to the training loop:

* strong labels (``train.labels=strong``): the merged (1 + N)-way NLL, ``NLL(log [mean_n P_bg^n, P_fg^1..N],
  label)`` over the query's pixels (255 ignored);
* weak labels (``train.labels=weak``, class tags only): ``NLL(log mean_p [P_bg^n(p), P_fg^n(p)], presence_n)``
  per way, so a class present somewhere must raise its mean foreground probability, an absent one lower it.

Training episodes are 1-way, as the reference trains (``--way 1``) before testing N-way; the objectives take N
from the batch. A method's own auxiliary losses are not used in FS-CS training (the reference's objective is the
merged NLL alone). Validation during FS-CS training is an FS-CS evaluation (``eval.way`` ways,
``train.val_episodes``), selected on its mIoU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor

from fewshot.data.base import IGNORE_INDEX, FewShotBenchmark
from fewshot.fscs import (
    FscsDataset,
    FscsSpec,
    check_fscs_episodes,
    evaluate_fscs,
    evaluate_fscs_seeds,
    fscs_collate,
    load_fscs_episodes,
    make_fscs_episodes,
    merge_ways,
    run_ways,
)
from finetune.config import FinetuneConfig, eval_spec
from finetune.methods import FewShotMethod

TRAIN_WAY = 1  # the reference trains 1-way episodes and tests N-way ones
PROB_EPS = 1e-8  # log of a probability that underflowed to 0 stays finite


def fscs_spec(cfg: FinetuneConfig, **changes: Any) -> FscsSpec:
    """The FS-CS evaluation protocol of the config: ``eval.*`` as for FS-S, plus ``eval.way``."""
    base = dataclasses.asdict(eval_spec(cfg))
    return FscsSpec(**{**base, "way": cfg.eval.way, **changes})


def strong_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Merged (1 + N)-way NLL: ``logits [B,N,2,S,S]`` per way, ``target [B,S,S]`` in 0..N (255 ignored).

    With N = 1 it is the cross-entropy of the method's two-class logits.
    """
    merged = merge_ways(logits.float().softmax(dim=2))                       # [B,1+N,S,S]
    return F.nll_loss(merged.clamp_min(PROB_EPS).log(), target.long(), ignore_index=ignore_index)


def weak_loss(logits: Tensor, presence: Tensor) -> Tensor:
    """Class-tag NLL: ``logits [B,N,2,S,S]``, ``presence [B,N]`` bool -> ``NLL(log mean_p P, presence)``."""
    mean = logits.float().softmax(dim=2).mean(dim=(-2, -1))                  # [B,N,2]
    return F.nll_loss(mean.clamp_min(PROB_EPS).log().flatten(0, 1), presence.long().flatten())


def visible_presence(query_label: Tensor, ways: int) -> Tensor:
    """``query_label [B,S,S]`` (0..N, 255) -> ``[B,N]`` bool: the way's class has a pixel in the (cropped)
    training view, the tag a weak label gives for what the model sees."""
    return torch.stack([(query_label == n + 1).flatten(1).any(1) for n in range(ways)], dim=1)


def fscs_train_step(model: Callable, batch: dict[str, Any], labels: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward one collated FS-CS training batch (see :class:`fewshot.fscs.FscsDataset`) and its loss.

    Returns the scalar loss and its detached parts (``strong_nll`` or ``weak_nll``).
    """
    logits, _ = run_ways(model, batch["query"], batch["supports"], batch["support_masks"])  # [B,N,2,S,S]
    if labels == "weak":
        loss = weak_loss(logits, visible_presence(batch["query_label"], logits.shape[1]))
    else:
        loss = strong_loss(logits, batch["query_label"])
    return loss, {f"{labels}_nll": loss.detach()}


def fscs_train_dataset(cfg: FinetuneConfig, train_set: FewShotBenchmark, transform: Callable, epoch: int,
                       n_episodes: int, way: int = TRAIN_WAY) -> tuple[FscsDataset, Callable]:
    """The FS-CS training episodes of one epoch (a fresh draw from ``train.seed + epoch``, shuffled image
    order as FS-S training) as a dataset, with its collate function."""
    tc = cfg.train
    episodes = make_fscs_episodes(train_set, way, cfg.shot, n_episodes, tc.seed + epoch, "shuffle")
    return (FscsDataset(train_set, episodes, transform, way, cfg.shot, tc.seed, epoch, cfg.data.on_bad_sample),
            fscs_collate)


def fscs_validate(model: FewShotMethod, val_set: FewShotBenchmark, cfg: FinetuneConfig,
                  accelerator: Accelerator) -> tuple[dict[str, float], float]:
    """FS-CS validation on the held-out split: (scalars to log, the score selecting the best weights: mIoU)."""
    spec = fscs_spec(cfg, episodes=cfg.train.val_episodes, shot=cfg.shot)
    summary = evaluate_fscs(model, val_set, spec, cfg.train.seed, accelerator, desc="validate FS-CS")["meter"]
    return {"val/miou": summary["miou"], "val/fbiou": summary["fbiou"], "val/er": summary["er"]}, summary["miou"]


def check_fscs_splits(cfg: FinetuneConfig, benches: dict[str, FewShotBenchmark]) -> None:
    """Read every image the FS-CS evaluation episodes use, before any training (bad data must fail now)."""
    episodes = load_fscs_episodes(cfg.eval.episodes_file) if cfg.eval.episodes_file else None
    for bench in benches.values():
        check_fscs_episodes(bench, fscs_spec(cfg), list(cfg.eval.seeds), episodes)


def run_fscs_evaluation(cfg: FinetuneConfig, accelerator: Accelerator, model: FewShotMethod,
                        benchmark: FewShotBenchmark, out_dir: Path, checkpoint: str, weights: Path | None = None,
                        source: str = "") -> dict[str, Any]:
    """FS-CS evaluation of ``model`` (with ``weights`` loaded, if given) on ``benchmark`` with every seed."""
    from finetune.evaluate import prepare_evaluation  # finetune.evaluate dispatches here: imported when called

    model = prepare_evaluation(cfg, accelerator, model, out_dir, weights)
    episodes = load_fscs_episodes(cfg.eval.episodes_file) if cfg.eval.episodes_file else None
    name = source if cfg.data.sources else cfg.data.benchmark
    meta = {"method": cfg.model.method, "benchmark": name, "fold": str(cfg.data.fold), "checkpoint": checkpoint,
            **({"episodes_file": cfg.eval.episodes_file} if episodes else {})}
    results = evaluate_fscs_seeds(model, benchmark, fscs_spec(cfg), list(cfg.eval.seeds), accelerator, out_dir,
                                  meta, cfg.eval.vis_episodes, episodes)
    n = len(results["seeds"])
    pm = (lambda k: f"{100 * results[k + '_mean']:.2f}" + (f" ± {100 * results[k + '_std']:.2f}" if n > 1 else ""))
    accelerator.print(f"{cfg.model.method} on {name} fold {cfg.data.fold} FS-CS {results['way']}-way "
                      f"{results['shot']}-shot ({results['protocol']}, {results['episodes']} episodes x {n} seeds): "
                      f"ER {pm('er')}, mIoU {pm('miou')}, FB-IoU {pm('fbiou')}")
    accelerator.print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}; "
                      f"pictures: {out_dir}/fscs_grid_*.png")
    return results
