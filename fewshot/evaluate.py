"""The evaluation core: score any segmenter on a fixed episode list, the same way for every method.

The list is a pure function of (benchmark split, shot, count, seed, query order) and is saved as JSON with its
hash beside the results, so two methods evaluated with the same :class:`EvalSpec` saw the same episodes. It
is sharded over processes; class-wise intersections and unions are summed across processes, so the numbers
do not depend on the number of workers or processes. A result computed from no episode is an error, and so
is a share of skipped (bad) episodes above ``max_skipped``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common.errors import DataError
from common.io import write_json, write_text
from fewshot.data.base import IGNORE_INDEX, EpisodeSpec, FewShotBenchmark
from fewshot.data.episodes import episodes_hash, make_episodes, save_episodes
from fewshot.data.loader import EpisodeDataset, collate
from fewshot.data.transforms import EvalTransform
from fewshot.metrics import SegmentationMeter, region_map_recall
from fewshot.report import results_markdown
from fewshot.segmenter import class_name_kwargs
from fewshot.vis import column_titles, episode_row, save_grid


@dataclass(frozen=True)
class EvalSpec:
    """Everything that decides which episodes are scored and how; equal specs give comparable numbers.

    Attributes:
        shot: supports per episode.
        episodes: episodes per seed (cycle / shuffle order: 0 = one per image).
        protocol: ``pfenet`` (aspect-preserving resize + pad, logits upsampled to the original label) or
            ``hsnet`` (square resize, scored at the input size).
        size: the input canvas S (8n+1).
        query_order: ``cycle`` (PFENet), ``random`` (HSNet, class-uniform) or ``shuffle``.
        on_bad_sample: ``error`` or ``skip`` (counted, listed, bounded by ``max_skipped``).
        max_skipped: largest share of skipped episodes that still gives a number.
        batch_size, num_workers: speed only; the numbers do not depend on them.
    """

    shot: int
    episodes: int
    protocol: str = "pfenet"
    size: int = 473
    query_order: str = "cycle"
    on_bad_sample: str = "error"
    max_skipped: float = 0.1
    batch_size: int = 1
    num_workers: int = 0


def prediction_at_label(logits: torch.Tensor, label: torch.Tensor, query_mask: torch.Tensor,
                        protocol: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) pair scored for one episode.

    pfenet: the original-resolution ``label [H0,W0]`` is padded top-left to a square of side max(H0, W0) with
    255 and the ``logits [2,S,S]`` are upsampled (bilinear, align_corners) to that square, as the reference
    test code does. hsnet: scored at the input size against the resized ``query_mask [S,S]``.
    """
    if protocol == "hsnet":
        return logits.argmax(0), query_mask
    h, w = label.shape
    side = max(h, w)
    target = torch.full((side, side), IGNORE_INDEX, dtype=torch.long, device=logits.device)
    target[:h, :w] = label.long()
    up = F.interpolate(logits[None].float(), size=(side, side), mode="bilinear", align_corners=True)[0]
    return up.argmax(0), target


def episode_loader(dataset: EpisodeDataset | Subset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A sequential loader over episodes (the list is already in its random order) with :func:`collate`."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a collated batch to ``device`` (lists of keys and original masks stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_skipped(skipped: list[str], total: int, max_share: float, what: str) -> None:
    """Raise when every episode, or more than ``max_share`` of ``total``, was skipped as bad input."""
    if not skipped:
        return
    if len(skipped) >= total:
        raise DataError(f"{what}: all {total} episodes were skipped as bad input, nothing was scored "
                        f"(first: {skipped[0]})")
    if len(skipped) > max_share * total:
        raise DataError(f"{what}: {len(skipped)} of {total} episodes ({100 * len(skipped) / total:.1f}%) were "
                        f"skipped as bad input, more than the allowed {100 * max_share:g}% (first: {skipped[0]})")


def check_episodes(benchmark: FewShotBenchmark, spec: EvalSpec, seeds: list[int],
                   episodes: list[EpisodeSpec] | None = None) -> list[str]:
    """Read every (image, class) pair the evaluation of ``seeds`` will use, before any work is spent.

    Returns the bad pairs when ``spec.on_bad_sample == "skip"`` (an error if their share exceeds
    ``spec.max_skipped``); with ``error`` the first bad pair raises its :class:`DataError` naming the file.
    """
    lists = [episodes] if episodes is not None else [
        make_episodes(benchmark, spec.shot, spec.episodes, seed, spec.query_order) for seed in seeds]
    reader = EpisodeDataset(benchmark, lists[0], EvalTransform(spec.size, spec.protocol), spec.shot)
    pairs = {(key, e.class_id, role) for ep in lists for e in ep
             for key, role in [(e.query, "query"), *((k, "support") for k in e.supports)]}
    bad = []
    for key, class_id, role in sorted(pairs):
        try:
            reader.read(key, class_id, role)
        except DataError as err:
            if spec.on_bad_sample == "error":
                raise
            bad.append(str(err))
    check_skipped(bad, len(pairs), spec.max_skipped if spec.on_bad_sample == "skip" else 0.0,
                  f"{benchmark!r}: (image, class) pairs of the evaluation episodes")
    return bad


def merged_result(meter: Any, skipped: list[str], benchmark: FewShotBenchmark, spec: EvalSpec, count: int,
                  digest: str, accelerator: Accelerator, what: str) -> dict[str, Any]:
    """Sum every process's ``meter`` state and skipped list, refuse a result from (almost) nothing, summarise.

    ``meter`` is a :class:`SegmentationMeter` (or one with the same ``state`` / ``load_state`` / ``summary``).
    """
    meter.load_state(accelerator.gather(meter.state().to(accelerator.device)[None]))
    skipped = gather_object(skipped)
    check_skipped(skipped, count, spec.max_skipped if spec.on_bad_sample == "skip" else 0.0,
                  f"{benchmark!r} {what}")
    result: dict[str, Any] = {"meter": meter.summary(), "episodes_hash": digest, "episodes": count,
                              "skipped": skipped}
    result["meter"]["per_class_name"] = {str(benchmark.class_names.get(int(c), c)): v
                                         for c, v in result["meter"]["per_class_iou"].items()}
    return result


@torch.no_grad()
def evaluate(model: nn.Module, benchmark: FewShotBenchmark, spec: EvalSpec, seed: int, accelerator: Accelerator,
             out_dir: Path | None = None, vis_episodes: int = 0, recall_thresholds: list[float] | None = None,
             episode_meta: dict[str, Any] | None = None, episodes: list[EpisodeSpec] | None = None,
             desc: str = "evaluate") -> dict[str, Any]:
    """Score ``model`` on the episodes of ``(benchmark, spec, seed)`` (or the given ``episodes``).

    Every process must call it (episodes are sharded, statistics gathered). Writes the episode list (and the
    first ``vis_episodes`` as a PNG grid) to ``out_dir`` when given.

    Returns:
        ``{"meter": {miou, fbiou, per_class_iou, per_class_name, episodes}, "episodes_hash", "episodes",
        "skipped", "recall" (per map, when thresholds are given), "grid"}``.
    """
    if episodes is None:
        episodes = make_episodes(benchmark, spec.shot, spec.episodes, seed, spec.query_order)
    digest = episodes_hash(episodes)
    if out_dir is not None and accelerator.is_main_process:
        save_episodes(episodes, out_dir / f"episodes_{spec.shot}shot_seed{seed}.json",
                      {"benchmark": benchmark.name, "split": benchmark.split, **(episode_meta or {}),
                       "shot": spec.shot, "seed": seed, "count": spec.episodes})
    dataset = EpisodeDataset(benchmark, episodes, EvalTransform(spec.size, spec.protocol), spec.shot, seed, 0,
                             spec.on_bad_sample)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = episode_loader(Subset(dataset, list(range(rank, len(dataset), world))), spec.batch_size,
                            spec.num_workers)
    meter = SegmentationMeter(benchmark.class_ids)
    maps: dict[str, list[torch.Tensor]] = {}
    targets: list[torch.Tensor] = []
    rows, titles, skipped, map_names = [], [], [], []
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not accelerator.is_local_main_process,
                      leave=False):
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            out = model(batch["query"], batch["supports"], batch["support_masks"],
                        **class_name_kwargs(model, benchmark, batch["class_id"]))
        map_names = list(out.maps)
        for i in range(batch["size"]):
            pred, target = prediction_at_label(out.logits[i], batch["query_mask_orig"][i],
                                               batch["query_mask"][i], spec.protocol)
            c = int(batch["class_id"][i])
            iou = meter.update(pred.cpu(), target.cpu(), c)
            if recall_thresholds and out.maps:
                size = next(iter(out.maps.values())).shape[-2:]
                small = F.interpolate(batch["query_mask"][i][None, None].float(), size=size, mode="nearest")[0, 0]
                targets.append(small.cpu())
                for name, value in out.maps.items():
                    maps.setdefault(name, []).append(value[i, 0].float().cpu())
            index = int(batch["episode_index"][i])
            if out_dir is not None and index < vis_episodes:
                rows.append(episode_row(batch["supports"][i], batch["support_masks"][i], batch["query"][i],
                                        batch["query_mask"][i], out.logits[i].argmax(0),
                                        [m[i] for m in out.maps.values()]))
                titles.append(f"episode {index}  class {c} ({benchmark.class_names.get(c, c)})  IoU {iou:.3f}")
    if was_training:
        model.train()
    result = merged_result(meter, skipped, benchmark, spec, len(episodes), digest, accelerator, f"seed {seed}")
    if recall_thresholds and targets:
        target = torch.stack(targets)
        result["recall"] = {name: region_map_recall(torch.stack(values), target, recall_thresholds)
                            for name, values in maps.items()}
    if rows and out_dir is not None:
        order = sorted(range(len(rows)), key=lambda j: titles[j])
        path = out_dir / f"grid_{spec.shot}shot_seed{seed}_rank{rank}.png"
        save_grid([rows[j] for j in order], [titles[j] for j in order], path)
        result["grid"] = str(path)
        result["grid_columns"] = column_titles(spec.shot, map_names)
    return result


def evaluate_seeds(model: nn.Module, benchmark: FewShotBenchmark, spec: EvalSpec, seeds: list[int],
                   accelerator: Accelerator, out_dir: Path, meta: dict[str, Any], vis_episodes: int = 0,
                   recall_thresholds: list[float] | None = None,
                   episodes: list[EpisodeSpec] | None = None) -> dict[str, Any]:
    """:func:`evaluate` once per seed; writes ``results.json`` and ``results.md`` to ``out_dir``.

    ``meta`` (method, benchmark, fold, checkpoint, ...) is recorded at the top of the results.
    """
    per_seed = []
    for j, seed in enumerate(seeds):
        r = evaluate(model, benchmark, spec, seed, accelerator, out_dir, vis_episodes if j == 0 else 0,
                     recall_thresholds, {"fold": meta.get("fold", "")}, episodes, desc=f"evaluate seed {seed}")
        per_seed.append({"seed": seed, **r})
    mious = [r["meter"]["miou"] for r in per_seed]
    fbious = [r["meter"]["fbiou"] for r in per_seed]
    results = {
        **meta, "shot": spec.shot, "protocol": spec.protocol, "split": benchmark.split,
        "episodes": len(episodes) if episodes is not None else spec.episodes, "seeds": list(seeds),
        "eval_size": spec.size, "processes": accelerator.num_processes,
        "miou_mean": statistics.mean(mious), "miou_std": statistics.pstdev(mious),
        "fbiou_mean": statistics.mean(fbious), "fbiou_std": statistics.pstdev(fbious),
        "per_seed": per_seed,
    }
    if accelerator.is_main_process:
        write_json(out_dir / "results.json", results)
        write_text(out_dir / "results.md", results_markdown(results))
    return results
