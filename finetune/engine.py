"""Stage-2 training and evaluation loops (explicit, one function each).

Training draws a fresh episode list per epoch from ``seed + epoch``; augmentation is seeded per episode; the
learning rate is derived from the step. Together with the checkpointed weights, optimiser and RNG states this
makes ``--resume auto`` continue exactly. Model selection uses a held-out validation split of the *training*
classes, never the test episodes.

Evaluation runs a fixed episode list (a function of benchmark, fold, shot, seed and count, saved to JSON with
its hash), sharded over processes, and accumulates class-wise intersections and unions that are summed across
processes, so the numbers do not depend on the number of workers or processes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import gather_object
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from common.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from common.config import flatten
from common.runlog import MetricsLog, markdown_table, write_json
from finetune.config import FinetuneConfig
from finetune.data.base import IGNORE_INDEX, FewShotBenchmark
from finetune.data.episodes import epoch_episodes, episodes_hash, make_episodes, save_episodes
from finetune.data.loader import EpisodeDataset, collate
from finetune.data.transforms import EvalTransform, build_transform
from finetune.metrics import SegmentationMeter, region_map_recall
from finetune.model.qgnet import QGNet, qgnet_loss
from finetune.vis import column_titles, episode_row, save_grid

BEST = "best_model.safetensors"


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    best_weights: Path | None
    best_val_miou: float
    skipped: list[str] = field(default_factory=list)


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """PFENet's per-iteration poly schedule: ``base * (1 - step / total) ** power``."""
    return base * (1.0 - step / max(total, 1)) ** power


def make_optimizer(cfg: FinetuneConfig, model: QGNet) -> torch.optim.Optimizer:
    """The ``optim.*`` optimiser over the head's parameters (the lr is then set per step by :func:`poly_lr`)."""
    params, o = model.trainable_parameters(), cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(cfg: FinetuneConfig, accelerator: Accelerator, model: QGNet, run_dir: Path,
          train_set: FewShotBenchmark, val_set: FewShotBenchmark | None, resume: str | None = None) -> TrainResult:
    """Train the head of ``model`` on episodes of ``train_set``; validate on ``val_set`` every ``val_every``."""
    tc = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    transform = build_transform(cfg.data, train=True)
    per_epoch = tc.episodes_per_epoch or len(epoch_episodes(train_set, cfg.shot, tc.seed, 0))
    steps_per_epoch = per_epoch // (tc.batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{per_epoch} episodes per epoch cannot fill one batch of {tc.batch_size} x {world} "
                         "processes; lower train.batch_size or raise train.episodes_per_epoch")
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch

    optimizer = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: QGNet = accelerator.unwrap_model(model)
    step, best, checkpoint = 0, -1.0, None
    if resume:
        found = find_checkpoint(run_dir, resume)
        if found is not None:
            _, state = load_checkpoint(accelerator, found)
            step, best, checkpoint = state["step"], state["best_val_miou"], found
            accelerator.print(f"resumed from {found} at step {step}")
    best_path = run_dir / BEST if (run_dir / BEST).is_file() else None

    accelerator.init_trackers("finetune", config=flatten(cfg))
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=step, desc="finetune", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    skipped: list[str] = []
    tick = time.perf_counter()
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        episodes = epoch_episodes(train_set, cfg.shot, tc.seed, epoch, per_epoch)
        dataset = EpisodeDataset(train_set, episodes, transform, cfg.shot, tc.seed, epoch, cfg.data.on_bad_sample)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=True)
        loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.data.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(tc.seed))
        for batch in skip_first_batches(loader, offset) if offset else loader:
            skipped += batch["skipped"]
            lr = poly_lr(cfg.optim.lr, step, total_steps, cfg.optim.power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, parts = torch.zeros(()), {"main": torch.zeros(()), "aux": torch.zeros(())}
            if batch["size"]:  # every episode of the batch skipped: nothing to learn from, the step still counts
                batch = _to_device(batch, accelerator.device)
                out = model(batch["query"], batch["supports"], batch["support_masks"])
                loss, parts = qgnet_loss(out, batch["query_mask"], cfg.model.aux_weight)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == total_steps:
                scalars = {"loss/total": loss.item(), "loss/main": parts["main"].item(),
                           "loss/aux": parts["aux"].item(), "lr": lr,
                           "time/s_per_step": (time.perf_counter() - tick) / tc.log_every,
                           "data/skipped_episodes": len(skipped)}
                accelerator.log(scalars, step=step)
                log.write({"step": step, "epoch": epoch, **scalars})
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
                tick = time.perf_counter()
            epoch_done = step % steps_per_epoch == 0
            if val_set is not None and tc.val_every and epoch_done and (step // steps_per_epoch) % tc.val_every == 0:
                summary = evaluate(core, cfg, accelerator, val_set, cfg.shot, tc.seed, tc.val_episodes,
                                   protocol=cfg.eval.protocol, desc="validate")["meter"]
                accelerator.log({"val/miou": summary["miou"], "val/fbiou": summary["fbiou"]}, step=step)
                log.write({"step": step, "val/miou": summary["miou"], "val/fbiou": summary["fbiou"]})
                if summary["miou"] > best:
                    best = summary["miou"]
                    if accelerator.is_main_process:
                        best_path = _save_weights(core, run_dir / BEST, {"step": str(step), "val_miou": str(best)})
                model.train()
            if step % tc.checkpoint_every == 0 or step == total_steps:
                checkpoint = save_checkpoint(accelerator, run_dir, step, {}, {
                    "step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "best_val_miou": best, "world_size": world}, keep_last=tc.keep_last)
            if step >= total_steps:
                break
    bar.close()
    if skipped and accelerator.is_main_process:
        (run_dir / "skipped_episodes.txt").write_text("".join(s + "\n" for s in skipped))
        accelerator.print(f"{len(skipped)} training episodes skipped (see {run_dir / 'skipped_episodes.txt'})")
    if accelerator.is_main_process:  # the last weights, for evaluation without a validation split
        _save_weights(core, run_dir / "last_model.safetensors", {"step": str(step)})
    accelerator.wait_for_everyone()
    return TrainResult(step, checkpoint, best_path, best, skipped)


def _save_weights(model: torch.nn.Module, path: Path, meta: dict[str, str]) -> Path:
    """Full model state (frozen backbones included: their BN statistics move in the reference training mode)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# evaluation


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


@torch.no_grad()
def evaluate(model: QGNet, cfg: FinetuneConfig, accelerator: Accelerator, benchmark: FewShotBenchmark,
             shot: int, seed: int, n_episodes: int, protocol: str = "pfenet", out_dir: Path | None = None,
             vis_episodes: int = 0, recall_thresholds: list[float] | None = None,
             desc: str = "evaluate") -> dict[str, Any]:
    """Evaluate on a fixed episode list; returns ``{"meter": summary, "episodes_hash", "recall", ...}``.

    Every process must call it (episodes are sharded, statistics gathered).
    """
    episodes = make_episodes(benchmark, shot, n_episodes, seed, cfg.data.query_order)
    digest = episodes_hash(episodes)
    if out_dir is not None and accelerator.is_main_process:
        save_episodes(episodes, out_dir / f"episodes_{shot}shot_seed{seed}.json",
                      {"benchmark": benchmark.name, "split": benchmark.split, "fold": str(cfg.data.fold),
                       "shot": shot, "seed": seed, "count": n_episodes})
    dataset = EpisodeDataset(benchmark, episodes, EvalTransform(cfg.data.eval_size, protocol), shot, seed, 0,
                             cfg.data.on_bad_sample)
    world, rank = accelerator.num_processes, accelerator.process_index
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    loader = DataLoader(shard, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.eval.num_workers,
                        collate_fn=collate)
    meter = SegmentationMeter(benchmark.class_ids)
    maps: dict[str, list[torch.Tensor]] = {"prior": [], "guided": [], "target": []}
    rows, titles, skipped = [], [], []
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not accelerator.is_local_main_process,
                      leave=False):
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        batch = _to_device(batch, accelerator.device)
        with accelerator.autocast():
            out = model(batch["query"], batch["supports"], batch["support_masks"])
        for i in range(batch["size"]):
            pred, target = prediction_at_label(out.logits[i], batch["query_mask_orig"][i],
                                               batch["query_mask"][i], protocol)
            c = int(batch["class_id"][i])
            iou = meter.update(pred.cpu(), target.cpu(), c)
            if recall_thresholds:
                size = out.guided_map.shape[-2:]
                small = F.interpolate(batch["query_mask"][i][None, None].float(), size=size, mode="nearest")[0, 0]
                maps["target"].append(small.cpu())
                maps["guided"].append(out.guided_map[i, 0].float().cpu())
                if out.prior_map is not None:
                    maps["prior"].append(out.prior_map[i, 0].float().cpu())
            index = int(batch["episode_index"][i])
            if out_dir is not None and index < vis_episodes:
                rows.append(episode_row(batch["supports"][i], batch["support_masks"][i], batch["query"][i],
                                        batch["query_mask"][i], out.logits[i].argmax(0), _item(out.prior_map, i),
                                        out.guided_map[i]))
                titles.append(f"episode {index}  class {c} ({benchmark.class_names.get(c, c)})  IoU {iou:.3f}")
    if was_training:
        model.train()
    state = accelerator.gather(meter.state().to(accelerator.device)[None])
    meter.load_state(state)
    result: dict[str, Any] = {"meter": meter.summary(), "episodes_hash": digest, "episodes": len(episodes),
                              "skipped": gather_object(skipped)}
    result["meter"]["per_class_name"] = {benchmark.class_names.get(int(c), c): v
                                         for c, v in result["meter"]["per_class_iou"].items()}
    if recall_thresholds and maps["target"]:
        target = torch.stack(maps["target"])
        result["recall"] = {name: region_map_recall(torch.stack(maps[name]), target, recall_thresholds)
                            for name in ("guided", "prior") if maps[name]}
    if rows and out_dir is not None:
        order = sorted(range(len(rows)), key=lambda j: titles[j])
        path = out_dir / f"grid_{shot}shot_seed{seed}_rank{rank}.png"
        save_grid([rows[j] for j in order], [titles[j] for j in order], path)
        result["grid"] = str(path)
        result["grid_columns"] = column_titles(shot)
    return result


def _item(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[i]


def evaluate_seeds(model: QGNet, cfg: FinetuneConfig, accelerator: Accelerator, benchmark: FewShotBenchmark,
                   out_dir: Path, checkpoint: str) -> dict[str, Any]:
    """The fixed protocol over ``cfg.eval.seeds``; writes ``results.json`` and ``results.md`` to ``out_dir``."""
    ec = cfg.eval
    shot = ec.shot or cfg.shot
    per_seed = []
    for j, seed in enumerate(ec.seeds):
        r = evaluate(model, cfg, accelerator, benchmark, shot, seed, ec.episodes, ec.protocol, out_dir,
                     ec.vis_episodes if j == 0 else 0, ec.recall_thresholds, desc=f"evaluate seed {seed}")
        per_seed.append({"seed": seed, **r})
    mious = [r["meter"]["miou"] for r in per_seed]
    fbious = [r["meter"]["fbiou"] for r in per_seed]
    results = {
        "benchmark": cfg.data.benchmark, "fold": str(cfg.data.fold), "shot": shot, "protocol": ec.protocol,
        "split": benchmark.split, "episodes": ec.episodes, "seeds": list(ec.seeds), "checkpoint": checkpoint,
        "eval_size": cfg.data.eval_size, "processes": accelerator.num_processes,
        "miou_mean": statistics.mean(mious), "miou_std": statistics.pstdev(mious),
        "fbiou_mean": statistics.mean(fbious), "fbiou_std": statistics.pstdev(fbious),
        "per_seed": per_seed,
    }
    if accelerator.is_main_process:
        write_json(out_dir / "results.json", results)
        (out_dir / "results.md").write_text(results_markdown(results, benchmark))
    return results


def results_markdown(results: dict[str, Any], benchmark: FewShotBenchmark) -> str:
    """Human-readable summary: headline, per-class IoU per seed, region-map recall."""
    head = (f"# {results['benchmark']} fold {results['fold']}, {results['shot']}-shot, {results['protocol']} "
            f"protocol\n\n{results['episodes']} episodes x {len(results['seeds'])} seeds ({results['seeds']}), "
            f"checkpoint `{results['checkpoint']}`\n\n")
    n = len(results["seeds"])
    summary = markdown_table(["mIoU (%)", "FB-IoU (%)"], [[
        f"{100 * results['miou_mean']:.2f}" + (f" ± {100 * results['miou_std']:.2f}" if n > 1 else ""),
        f"{100 * results['fbiou_mean']:.2f}" + (f" ± {100 * results['fbiou_std']:.2f}" if n > 1 else "")]])
    names = list(results["per_seed"][0]["meter"]["per_class_name"])
    per_class = markdown_table(["seed", *names], [
        [r["seed"], *[100 * r["meter"]["per_class_name"].get(k, 0.0) for k in names]] for r in results["per_seed"]])
    text = head + summary + "\nPer-class IoU (%):\n\n" + per_class
    recall = results["per_seed"][0].get("recall")
    if recall:
        thresholds = list(next(iter(recall.values())))
        text += "\nRegion-map recall of the ground-truth foreground at thresholds (paper Table 7, first seed):\n\n"
        text += markdown_table(["map", *[f"{t:g}" for t in thresholds]],
                               [[name, *[100 * v for v in r.values()]] for name, r in recall.items()], ".1f")
    return text
