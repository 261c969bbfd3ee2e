"""The stage-2 training loop, written out step by step (episodes -> method -> loss -> optimiser).

Training draws a fresh episode list per epoch from ``seed + epoch``; augmentation is seeded per episode; the learning
rate is derived from the step. With ``data.augment_on=device`` the workers send each image with its augmentation
parameters and :class:`~fewshot.data.device_augment.DeviceAugment` finishes the batch on the device. Together with the
checkpointed weights, optimiser and RNG states this makes ``--resume auto`` continue exactly. Model selection uses
episodes of held-out classes or images of the *training* sources (``val``), scored by the same evaluation core as the
test (:mod:`fewshot.evaluate`), never the test episodes. BAM's base stage (``train.stage=base``) runs the same loop over
images with multi-class labels (:mod:`finetune.base_stage`) and has no validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, DistributedSampler

from common.batch_augment import resolve_augment_on
from common.checkpoint import save_checkpoint
from common.io import save_tensors, write_text
from common.run import TrainLog, due, resume_from, set_lr
from fewshot.data.base import FewShotBenchmark
from fewshot.data.device_augment import DeviceAugment
from fewshot.data.episodes import epoch_episodes
from fewshot.data.loader import EpisodeDataset, collate
from fewshot.data.transforms import build_transform
from fewshot.evaluate import check_skipped, evaluate, to_device
from fewshot.segmenter import class_name_kwargs
from finetune.base_stage import base_train_dataset, base_train_step
from finetune.config import FinetuneConfig, eval_spec
from finetune.fscs import fscs_train_dataset, fscs_train_step, fscs_validate
from finetune.methods import FewShotMethod

BEST = "best_model.safetensors"
LAST = "last_model.safetensors"


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


def step_lr(base: float, step: int, total: int, milestones: list[float]) -> float:
    """``base / 10 ** (number of milestones passed)``; milestones are fractions of ``total`` steps."""
    return base * 0.1 ** sum(step >= m * total for m in milestones)


def schedule_lr(cfg: FinetuneConfig, step: int, total: int) -> float:
    """The learning rate of ``step`` under ``optim.schedule``."""
    o = cfg.optim
    return poly_lr(o.lr, step, total, o.power) if o.schedule == "poly" else step_lr(o.lr, step, total, o.milestones)


def make_optimizer(cfg: FinetuneConfig, model: FewShotMethod) -> torch.optim.Optimizer:
    """The ``optim.*`` optimiser over the method's trainable parameters (lr set per step by :func:`schedule_lr`)."""
    params, o = model.trainable_parameters(), cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def train(cfg: FinetuneConfig, accelerator: Accelerator, model: FewShotMethod, run_dir: Path,
          train_set: FewShotBenchmark, val_set: FewShotBenchmark | None, resume: str | None = None,
          allow_inexact: bool = False) -> TrainResult:
    """Train ``model``'s trainable parameters on episodes of ``train_set``; validate on ``val_set``.

    ``allow_inexact``: resume even from a checkpoint written with other settings (said, never silent).
    """
    tc = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    base = tc.stage == "base"  # BAM's base learner: images with multi-class labels, not episodes (base_stage.py)
    fscs = tc.task == "fscs"  # iFSL classify-and-segment episodes and objectives (finetune/fscs.py)
    augment_on = resolve_augment_on(cfg.data.augment_on, accelerator.device)
    if base or fscs:  # their datasets make finished images; only episode training has the device path
        if cfg.data.augment_on == "device":
            what = "train.stage=base" if base else "train.task=fscs"
            raise ValueError(f"data.augment_on=device is for episode training; {what} augments in the loader "
                             "workers (use data.augment_on=auto or worker)")
        augment_on = "worker"
    transform = build_transform(cfg.data, train=True, augment_on=augment_on)
    device_augment = DeviceAugment(cfg.data.train_size) if augment_on == "device" else None
    per_epoch = tc.episodes_per_epoch or (len(train_set.image_keys()) if base else
                                          len(epoch_episodes(train_set, cfg.shot, tc.seed, 0)))
    steps_per_epoch = per_epoch // (tc.batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{per_epoch} episodes per epoch cannot fill one batch of {tc.batch_size} x {world} "
                         "processes; lower train.batch_size or raise train.episodes_per_epoch")
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    val_spec = dataclasses.replace(eval_spec(cfg), episodes=tc.val_episodes, shot=cfg.shot)
    method = cfg.model.method if not base else f"{cfg.model.method}:base"  # a base run never resumes a meta run

    optimizer = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: FewShotMethod = accelerator.unwrap_model(model)
    resumed = resume_from(accelerator, run_dir, resume, {
        "global_batch": tc.batch_size * world, "method": method, "total_steps": total_steps,
        "augment_on": augment_on},
        allow_inexact=allow_inexact)
    step, checkpoint = resumed.step, resumed.checkpoint
    best = resumed.state.get("best_val_miou", -1.0)
    best_path = run_dir / BEST if (run_dir / BEST).is_file() else None

    log = TrainLog(accelerator, run_dir, "finetune", cfg, total_steps, step)

    def validate() -> None:  # score the validation classes; keep the weights when they are the best so far
        nonlocal best, best_path
        if fscs:
            scalars, score = fscs_validate(core, val_set, cfg, accelerator)
        else:
            summary = evaluate(core, val_set, val_spec, tc.seed, accelerator, desc="validate")["meter"]
            scalars, score = {"val/miou": summary["miou"], "val/fbiou": summary["fbiou"]}, summary["miou"]
        log.write(step, scalars)
        if score > best:
            best = score
            if accelerator.is_main_process:
                best_path = _save_weights(core, run_dir / BEST, {"step": str(step), "val_miou": str(best)})
        model.train()

    if val_set is not None and tc.val_every and tc.val_at_start and step == 0:
        validate()
    skipped: list[str] = []
    seen = 0
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        if fscs:
            dataset, collate_fn = fscs_train_dataset(cfg, train_set, transform, epoch, per_epoch)
        elif base:
            dataset, collate_fn = base_train_dataset(cfg, train_set, core.channel_of, transform, epoch, per_epoch)
        else:
            episodes = epoch_episodes(train_set, cfg.shot, tc.seed, epoch, per_epoch)
            dataset = EpisodeDataset(train_set, episodes, transform, cfg.shot, tc.seed, epoch,
                                     cfg.data.on_bad_sample)
            collate_fn = collate
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=True)
        loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.data.num_workers, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(tc.seed))
        for batch in skip_first_batches(loader, offset) if offset else loader:
            skipped += batch["skipped"]
            seen += batch["size"] + len(batch["skipped"])
            lr = schedule_lr(cfg, step, total_steps)
            set_lr(optimizer, lr)
            loss, parts = torch.zeros(()), {}
            if batch["size"]:  # every episode of the batch skipped: nothing to learn from, the step still counts
                batch = to_device(batch, accelerator.device)
                if device_augment is not None:  # the images of data.augment_on=device, batched (no host read)
                    batch = device_augment(batch)
                if fscs:
                    loss, parts = fscs_train_step(model, batch, tc.labels)
                elif base:
                    loss, parts = base_train_step(model, core, batch)
                else:
                    out = model(batch["query"], batch["supports"], batch["support_masks"],
                                **class_name_kwargs(core, train_set, batch["class_id"]))
                    loss, parts = core.loss(out, batch["query_mask"], batch["class_id"])
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
            step += 1
            log.advance()
            if due(step, tc.log_every, total_steps):
                scalars = {"loss/total": loss.item(), **{f"loss/{k}": v.item() for k, v in parts.items()},
                           "lr": lr, "time/s_per_step": log.seconds_since_last() / tc.log_every,
                           "data/skipped_episodes": len(skipped)}
                log.write(step, scalars, {"epoch": epoch}, {"loss": f"{loss.item():.3f}", "lr": f"{lr:.3g}"})
            epoch_done = step % steps_per_epoch == 0
            if val_set is not None and tc.val_every and epoch_done and (step // steps_per_epoch) % tc.val_every == 0:
                validate()
            if due(step, tc.checkpoint_every, total_steps):
                checkpoint = save_checkpoint(accelerator, run_dir, step, {}, {
                    "step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "best_val_miou": best, "world_size": world, "global_batch": tc.batch_size * world,
                    "method": method, "augment_on": augment_on}, keep_last=tc.keep_last)
            if step >= total_steps:
                break
    log.close()
    if skipped and accelerator.is_main_process:
        write_text(run_dir / "skipped_episodes.txt", "".join(s + "\n" for s in skipped))
        accelerator.print(f"{len(skipped)} training episodes skipped (see {run_dir / 'skipped_episodes.txt'})")
    all_skipped = [s for part in gather_object([skipped]) for s in part]
    check_skipped(all_skipped, sum(gather_object([seen])), tc.max_skipped, f"training on {train_set!r}")
    if accelerator.is_main_process:  # the last weights, for evaluation without a validation split
        _save_weights(core, run_dir / LAST, {"step": str(step)})
    accelerator.wait_for_everyone()
    return TrainResult(step, checkpoint, best_path, best, skipped)


def _save_weights(model: torch.nn.Module, path: Path, meta: dict[str, str]) -> Path:
    """Full model state (frozen backbones included: their BN statistics move in the reference training mode), with
    the model's own ``weights_metadata()`` when it has one (BAM's base learner: its class -> channel table)."""
    own = model.weights_metadata() if hasattr(model, "weights_metadata") else {}
    return save_tensors(path, model.state_dict(), {**own, **meta})
