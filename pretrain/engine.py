"""The stage-1 training loop, written out step by step (MoCo order: momentum update, encode, loss, enqueue).

Everything that varies from step to step is either saved in the checkpoint (weights, optimiser, queues,
RNG states) or derived from the step counter (epoch, position in the epoch, learning rate), which is what
makes ``--resume auto`` continue exactly where a killed run stopped.

A step reads nothing back from the accelerator: its scalars are summed on the device and read (one
synchronisation) only on logging steps, the queues keep their pointers on the device, and the pooled
branch is sized from the loader's ``region_count``. With ``data.augment_on=device`` the views are made
here, batched on the device (:class:`pretrain.device_views.DeviceViews`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, DistributedSampler

from common.batch_augment import resolve_augment_on as resolve_on
from common.checkpoint import save_checkpoint
from common.run import TrainLog, due, resume_from, set_lr
from pretrain.config import PretrainConfig
from pretrain.data import PretrainImages, collate_views
from pretrain.device_views import HOST_KEYS, DeviceViews
from pretrain.losses import info_nce
from pretrain.model import MoCoPrior
from queues.feature_queue import FeatureQueue


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    last_metrics: dict[str, float]


def scaled_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """MoCo's linear scaling rule: base_lr is for a global batch of 256."""
    return cfg.optim.base_lr * global_batch / 256


def lr_at(cfg: PretrainConfig, peak: float, step: int, total: int) -> float:
    """Learning rate at ``step`` (cosine to 0 over ``total`` steps, no warm-up, as MoCo-v2 ``--cos``)."""
    if cfg.optim.schedule == "constant":
        return peak
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def make_optimizer(cfg: PretrainConfig, model: MoCoPrior, lr: float, device: torch.device) -> torch.optim.SGD:
    """SGD over the query side only (the key side moves by momentum), with ``optim.implementation``'s kernel."""
    params = [p for m in model.query_modules() for p in m.parameters() if p.requires_grad]
    impl = cfg.optim.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay, **kernel)


def resolve_augment_on(cfg: PretrainConfig, device: torch.device) -> str:
    """``data.augment_on`` with ``auto`` decided: device on CUDA, worker elsewhere (shared with stage 2)."""
    return resolve_on(cfg.data.augment_on, device)


def uses_channels_last(cfg: PretrainConfig, device: torch.device, bn_mode: str) -> bool:
    """``train.memory_format`` with ``auto`` decided: channels_last with CUDA, unless BatchNorm is split.

    lightly's SplitBatchNorm (one process) views each batch as ``[B / splits, C * splits, H, W]``, which an NHWC
    tensor cannot be viewed as; with several processes (shuffle BN) BatchNorm is plain and NHWC works.
    """
    fmt = cfg.train.memory_format
    if fmt == "channels_last" and bn_mode == "split":
        raise ValueError("train.memory_format=channels_last cannot run with split BatchNorm (model.bn_mode=split, or "
                         "auto on one process): use train.memory_format=auto, or several processes (shuffle BN)")
    return fmt == "channels_last" or (fmt == "auto" and device.type == "cuda" and bn_mode != "split")


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """Move a loader batch to ``device``; JPEG bytes and ``region_count`` stay on the host (see ``HOST_KEYS``)."""
    out = {}
    for key, value in batch.items():
        if key in HOST_KEYS:
            out[key] = value
            continue
        value = value.to(device, non_blocking=True)
        if channels_last and value.ndim == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def make_queues(cfg: PretrainConfig, device: torch.device) -> dict[str, FeatureQueue]:
    """The global and the local queue, identical on every rank (seeded), on the accelerator."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    queues = {}
    if cfg.uses_global:
        queues["global"] = FeatureQueue(cfg.queue.global_size, cfg.model.out_dim, gen).to(device)
    if cfg.uses_local:
        queues["local"] = FeatureQueue(cfg.queue.local_size, cfg.model.out_dim, gen).to(device)
    return queues


def queue_tensors(queues: dict[str, FeatureQueue]) -> dict[str, torch.Tensor]:
    return {f"queue.{name}.{k}": v for name, q in queues.items() for k, v in q.state_dict().items()}


def restore_queues(queues: dict[str, FeatureQueue], tensors: dict[str, torch.Tensor]) -> None:
    for name, q in queues.items():
        prefix = f"queue.{name}."
        q.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def train_step(model: torch.nn.Module, queues: dict[str, FeatureQueue], batch: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, accelerator: Accelerator,
               cfg: PretrainConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One MoCo step: momentum update, encode, InfoNCE against the queues, backward, SGD, enqueue.

    ``model`` is the prepared (possibly DDP-wrapped) :class:`MoCoPrior`; returns (detached scalar tensors, total
    loss), both still on the device: reading them is the caller's choice (on logging steps only).
    """
    accelerator.unwrap_model(model).momentum_update()
    out = model(batch)
    temperature = cfg.loss.temperature
    loss = torch.zeros((), device=accelerator.device)
    scalars: dict[str, torch.Tensor] = {}
    if cfg.uses_global:
        loss_g, acc_g = info_nce(out["q"], out["k"], queues["global"].keys, temperature)
        loss = loss + cfg.loss.global_weight * loss_g
        scalars.update({"loss/global": loss_g.detach(), "acc/global_top1": acc_g.detach()})
    if cfg.uses_local:
        loss_l, acc_l = info_nce(out["local_q"], out["local_k"], queues["local"].keys, temperature,
                                 out["local_valid"])
        loss = loss + cfg.loss.local_weight * loss_l
        scalars.update({"loss/local": loss_l.detach(), "acc/local_top1": acc_l.detach()})
    scalars["loss/total"] = loss.detach()
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    # enqueue after backward: the logits above still reference the queue as it was
    if cfg.uses_global:
        queues["global"].enqueue(accelerator.gather(out["k"]))
    if cfg.uses_local:
        queues["local"].enqueue(accelerator.gather(out["local_k"]), accelerator.gather(out["local_valid"]))
    return scalars, loss


def check_queues_agree(queues: dict[str, FeatureQueue], accelerator: Accelerator) -> list[str]:
    """sha256 of every rank's queues; ranks that disagree would train on different negatives, so fail loudly."""
    digest = hashlib.sha256()
    for name in sorted(queues):
        digest.update(queues[name].keys.detach().cpu().numpy().tobytes())
        digest.update(str(int(queues[name].ptr)).encode())
    digests = gather_object([digest.hexdigest()[:16]])
    if len(set(digests)) > 1:
        raise RuntimeError(f"queues differ between ranks: {digests}")
    return digests


def train(cfg: PretrainConfig, accelerator: Accelerator, run_dir: Path, image_paths: list[Path],
          cache_dir: Path, resume: str | None = None, allow_inexact: bool = False) -> TrainResult:
    """Pretrain the prior extractor on ``image_paths``; returns the final step and checkpoint folder."""
    device = accelerator.device
    augment_on = resolve_augment_on(cfg, device)
    dataset = PretrainImages(image_paths, cfg, cache_dir, augment_on)
    views = DeviceViews(cfg, device) if augment_on == "device" else None
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    # the loader draws worker base seeds from its own generator, not the global RNG: a resumed run makes a
    # new iterator mid-epoch, and that must not shift the random stream the model side (key shuffle) uses
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", collate_fn=collate_views,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images cannot fill one batch of {cfg.train.batch_size} x {world} "
                         "processes; lower train.batch_size or add images")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    model = MoCoPrior(cfg, world_size=world)
    channels_last = uses_channels_last(cfg, device, model.bn_mode)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:  # in place, so parameter names (and checkpoints) stay those of the eager model
        model.query_encoder.compile()
        model.key_encoder.compile()
    queues = make_queues(cfg, device)
    global_batch = cfg.train.batch_size * world
    peak_lr = scaled_lr(cfg, global_batch)
    optimizer = make_optimizer(cfg, model, peak_lr, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: MoCoPrior = accelerator.unwrap_model(model)

    # the views of a device-augmented run differ from a worker-augmented one: resuming across modes is refused
    resumed = resume_from(accelerator, run_dir, resume, {
        "global_batch": global_batch, "arch": cfg.model.arch, "total_steps": total_steps,
        "augment_on": augment_on}, allow_inexact=allow_inexact)
    if resumed.checkpoint is not None:
        restore_queues(queues, {k: v.to(accelerator.device) for k, v in resumed.extra.items()})
    step, checkpoint = resumed.step, resumed.checkpoint

    log = TrainLog(accelerator, run_dir, "pretrain", cfg, total_steps, step)
    last: dict[str, float] = {}
    sums: dict[str, torch.Tensor] = {}  # on the device, since the last log (or the resume)
    steps_since = 0
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = skip_first_batches(loader, offset) if offset else loader
        for batch in epoch_loader:
            batch = to_device(batch, device, channels_last)
            if views is not None:
                batch = to_device(views(batch), device, channels_last)
            lr = lr_at(cfg, peak_lr, step, total_steps)
            set_lr(optimizer, lr)
            step_scalars, _ = train_step(model, queues, batch, optimizer, accelerator, cfg)
            sums = {k: sums[k] + v if k in sums else v.clone() for k, v in step_scalars.items()}
            step += 1
            steps_since += 1
            log.advance()
            if due(step, cfg.train.log_every, total_steps):  # the only place a step's numbers reach the host
                scalars = {k: v.item() / steps_since for k, v in sums.items()}
                scalars.update({"lr": lr, "momentum": core.momentum, "throughput/images_per_s":
                                steps_since * global_batch / max(log.seconds_since_last(), 1e-9)})
                scalars.update({f"queue/{n}_fill": q.fill_fraction for n, q in queues.items()})
                log.write(step, scalars, {"epoch": epoch},
                          {"loss": f"{scalars['loss/total']:.3f}", "lr": f"{lr:.4f}"})
                sums, steps_since = {}, 0
                last = scalars
            if due(step, cfg.train.checkpoint_every, total_steps):
                digests = check_queues_agree(queues, accelerator)
                checkpoint = save_checkpoint(
                    accelerator, run_dir, step, queue_tensors(queues),
                    {"step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                     "world_size": world, "global_batch": global_batch, "arch": cfg.model.arch,
                     "augment_on": augment_on, "queue_digests_per_rank": digests},
                    keep_last=cfg.train.keep_last)
            if step >= total_steps:
                break
    log.close()
    return TrainResult(step=step, checkpoint=checkpoint, last_metrics=last)
