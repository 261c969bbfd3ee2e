"""Generalized FSS (``eval.task=gfss``, BAM): segment the base learner's classes and the episode's novel class
together in the query, scored by mIoU over the base classes, over the novel classes and their harmonic mean.

The episodes are the ordinary FS-S episodes of the test split (same list, same hash). Per query pixel, as the
reference's ``merge='final'`` rule: the episode's novel class where the BAM output's foreground probability
exceeds ``GFSS_TAU`` (0.9, the reference's ``merge_tau``), else the base learner's argmax (a base class or
background). The target is the query's full label map (:func:`fewshot.data.base_labels.gfss_target`): base classes
-> their channels, the episode's class -> n + 1, every other class -> background. Scored at the original label
(``pfenet``: padded to a square, scores upsampled) or at the input size (``hsnet``). The class ids of the test split
must be those the base learner was trained on: one benchmark (``data.sources`` empty).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import Subset
from tqdm import tqdm

from common.io import write_json, write_text
from fewshot.data.base import IGNORE_INDEX, FewShotBenchmark
from fewshot.data.base_labels import gfss_target, load_full
from fewshot.data.episodes import episodes_hash, load_episodes, make_episodes
from fewshot.data.loader import EpisodeDataset
from fewshot.data.transforms import EvalTransform
from fewshot.evaluate import check_skipped, episode_loader, to_device
from fewshot.metrics import GeneralizedMeter
from finetune.config import FinetuneConfig, eval_spec

GFSS_TAU = 0.9


def gfss_prediction(scores: torch.Tensor, base_logits: torch.Tensor, tau: float = GFSS_TAU) -> torch.Tensor:
    """``scores [2,H,W]`` (BAM's output), ``base_logits [1+n,H,W]`` -> int ``[H,W]``: n + 1 where the foreground
    probability exceeds ``tau``, else the base argmax (0 = background)."""
    novel = scores.float().softmax(0)[1] > tau
    return torch.where(novel, torch.full_like(novel, base_logits.shape[0], dtype=torch.long), base_logits.argmax(0))


def gfss_episode(scores: torch.Tensor, base_logits: torch.Tensor, label: np.ndarray, image: np.ndarray,
                 channel_of: dict[int, int], novel_id: int, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) of one episode at the scoring resolution of ``spec.protocol``."""
    target = gfss_target(label, channel_of, novel_id)
    if spec.protocol == "hsnet":
        _, small = EvalTransform(spec.size, "hsnet")(image, target)
        return gfss_prediction(scores, base_logits).cpu(), small
    h, w = target.shape
    side = max(h, w)
    padded = torch.full((side, side), IGNORE_INDEX, dtype=torch.long)
    padded[:h, :w] = torch.from_numpy(target.astype(np.int64))
    up = [F.interpolate(t[None].float(), size=(side, side), mode="bilinear", align_corners=True)[0]
          for t in (scores, base_logits)]
    return gfss_prediction(*up).cpu(), padded


@torch.no_grad()
def evaluate_gfss(model: Any, benchmark: FewShotBenchmark, cfg: FinetuneConfig, seed: int,
                  accelerator: Accelerator) -> dict[str, Any]:
    """Score the generalized FSS episodes of ``seed`` (every process calls it; statistics are summed)."""
    spec = eval_spec(cfg)
    episodes = (load_episodes(cfg.eval.episodes_file) if cfg.eval.episodes_file else
                make_episodes(benchmark, spec.shot, spec.episodes, seed, spec.query_order))
    channel_of = model.channel_of
    overlap = sorted(set(benchmark.class_ids) & set(channel_of))
    if overlap:
        raise ValueError(f"eval.task=gfss: test classes {overlap[:5]} are base classes of model.base_learner; the "
                         "base learner must have been trained on this benchmark's training classes")
    dataset = EpisodeDataset(benchmark, episodes, EvalTransform(spec.size, spec.protocol), spec.shot, seed, 0,
                             spec.on_bad_sample)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = episode_loader(Subset(dataset, list(range(rank, len(dataset), world))), spec.batch_size,
                            spec.num_workers)
    meter = GeneralizedMeter(max(channel_of.values()), benchmark.class_ids)
    skipped: list[str] = []
    model.eval()
    for batch in tqdm(loader, desc=f"GFSS seed {seed}", disable=not accelerator.is_local_main_process, leave=False):
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        batch = to_device(batch, accelerator.device)
        scores, base = model.gfss_scores(batch["query"], batch["supports"], batch["support_masks"])
        for i in range(batch["size"]):
            image, label = load_full(benchmark, batch["query_key"][i])
            c = int(batch["class_id"][i])
            meter.update(*gfss_episode(scores[i], base[i], label, image, channel_of, c, spec), c)
    meter.load_state(accelerator.gather(meter.state().to(accelerator.device)[None]))
    skipped = gather_object(skipped)
    check_skipped(skipped, len(episodes), spec.max_skipped if spec.on_bad_sample == "skip" else 0.0,
                  f"{benchmark!r} GFSS seed {seed}")
    return {"seed": seed, "meter": meter.summary(), "episodes_hash": episodes_hash(episodes),
            "episodes": len(episodes), "skipped": skipped}


def run_gfss_evaluation(cfg: FinetuneConfig, accelerator: Accelerator, model: Any, benchmark: FewShotBenchmark,
                        out_dir: Path, checkpoint: str, weights: Path | None = None) -> dict[str, Any]:
    """GFSS evaluation with every seed of ``eval.seeds``; writes ``results.json`` and ``results.md``."""
    from finetune.evaluate import prepare_evaluation  # finetune.evaluate dispatches here: imported when called

    if cfg.data.sources:
        raise ValueError("eval.task=gfss scores a benchmark's classes against the base learner's: it needs one "
                         "benchmark (data.sources=[])")
    if not hasattr(accelerator.unwrap_model(model), "gfss_scores"):
        raise ValueError(f"eval.task=gfss needs a base learner: model.method=bam, not {cfg.model.method!r}")
    model = prepare_evaluation(cfg, accelerator, model, out_dir, weights)
    per_seed = [evaluate_gfss(model, benchmark, cfg, seed, accelerator) for seed in cfg.eval.seeds]
    results: dict[str, Any] = {"method": cfg.model.method, "task": "gfss", "benchmark": cfg.data.benchmark,
                               "fold": str(cfg.data.fold), "checkpoint": checkpoint, "shot": eval_spec(cfg).shot,
                               "protocol": cfg.eval.protocol, "tau": GFSS_TAU, "seeds": list(cfg.eval.seeds),
                               "per_seed": per_seed}
    for key in ("miou_base", "miou_novel", "miou_hm"):
        values = [r["meter"][key] for r in per_seed]
        results[f"{key}_mean"], results[f"{key}_std"] = statistics.mean(values), statistics.pstdev(values)
    line = (f"{cfg.model.method} GFSS on {cfg.data.benchmark} fold {cfg.data.fold} {results['shot']}-shot: "
            f"mIoU base {100 * results['miou_base_mean']:.2f}, novel {100 * results['miou_novel_mean']:.2f}, "
            f"harmonic mean {100 * results['miou_hm_mean']:.2f}")
    if accelerator.is_main_process:
        write_json(out_dir / "results.json", results)
        write_text(out_dir / "results.md", f"# generalized FSS\n\n{line}\n")
    accelerator.print(f"{line}\nresults: {out_dir / 'results.json'}")
    return results
