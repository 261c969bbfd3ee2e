"""Stage-1 cost benchmark: what the local loss, the superpixel cache and the queues cost, in one run.

    python benchmarks/bench_pretrain.py [--arch resnet18 --size 224 --batch 16 --steps 10 --warmup 2]
        [--images DIR] [--threads N] [--json results.json]

1. Step time (median of ``--steps`` timed steps after ``--warmup``) of global-only MoCo-v2, global + local
   ``patch`` and global + local ``pooled``: :func:`pretrain.engine.train_step` itself (momentum update,
   forward, InfoNCE against the 65,536 x 128 queues, backward, SGD, enqueue) on models built by
   :class:`pretrain.model.MoCoPrior` from the same config except ``loss.*``. Each variant gets one real batch
   made beforehand by :class:`pretrain.data.PretrainImages`, so data loading is excluded; the variants are
   timed in turns (one step each, round robin) so that load from other processes hits them alike.
   Targets: pooled <= 1.10x and patch <= 1.35x the global-only step.
2. Data-loader time per sample (one process, one torch thread, as in a DataLoader worker) with superpixels
   read from the cache that :func:`superpixels.cache.precompute` fills, against the same dataset segmenting
   the image with SLIC each time it is read. Reported for the superpixel part alone (cached: hash the file
   bytes + read the ``.npz``; on the fly: decode + ``compute_superpixels``) and for the whole sample (decode,
   superpixels, views) of ``patch`` and ``pooled`` mode. Target: cached >= 10x faster.
3. Queue cost: ``info_nce`` forward + backward against a 65,536 x 128 queue plus ``FeatureQueue.enqueue``, for
   the rows each variant enqueues per step, timed alone, as a share of that variant's step. Target: < 2%.
4. Loader CPU cost per sample (1 thread, as a worker) of each ``data.augment_on`` mode for each variant, on
   JPEG copies of the images: ``worker`` (decode + PIL views), ``device`` (decode onto the canvas + draw the
   parameters) and ``device`` with ``decode_on=device`` (read the bytes + draw). Target in device mode: <= 3 ms,
   so 16 workers feed >= 5,000 images/s.
5. The device-side augmentation (:class:`pretrain.device_views.DeviceViews`) per batch, as a share of the
   variant's training step on the same batch (``--arch``, ``--size``, ``--batch``, this machine's device).
6. With CUDA (``benchmarks/gpu_check.sh``): end to end through the real DataLoader (``--gpu-workers``
   workers, ``augment_on=device``, ``decode_on=device``), ResNet-50, 224 px, bf16, batch ``--gpu-batch``:
   images/s per variant, the GPU's busy share (CUDA-event time of the step over wall time) and peak memory.
   Targets: >= 3,000 images/s for global-only and pooled, >= 2,400 for patch. Without CUDA: skipped, unless
   ``--e2e-on-cpu`` (a dry run of the same code at the given sizes, to check it before a GPU turn).

Images: scikit-image's bundled photos (``pretrain.data.materialise_builtin``) or every image under ``--images``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_pretrain.py` from a clone that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader

from common.config import load_config, replace
from common.images import read_rgb
from pretrain.config import PretrainConfig
from pretrain.data import PretrainImages, collate_views, source_images
from pretrain.device_views import DeviceViews
from pretrain.engine import make_optimizer, make_queues, scaled_lr, to_device, train_step, uses_channels_last
from pretrain.losses import info_nce
from pretrain.model import MoCoPrior
from queues.feature_queue import FeatureQueue
from superpixels.cache import precompute
from superpixels.segment import SuperpixelConfig, compute_superpixels

VARIANTS = {  # name -> loss overrides
    "global-only (MoCo-v2)": ["loss.local_weight=0"],
    "global + local patch": ["loss.local_mode=patch"],
    "global + local pooled": ["loss.local_mode=pooled"],
}
TARGETS = {"global + local pooled": 1.10, "global + local patch": 1.35}
DEVICE_LOADER_TARGET_MS = 3.0
GPU_TARGETS = {"global-only (MoCo-v2)": 3000, "global + local pooled": 3000, "global + local patch": 2400}
QUEUE_SHARE_TARGET = 0.02
CACHE_SPEEDUP_TARGET = 10.0


@dataclass
class Variant:
    """Everything one loss variant's ``train_step`` needs, built once and reused for every timed step."""

    name: str
    cfg: PretrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    queues: dict[str, FeatureQueue]
    batch: dict[str, torch.Tensor]


class SlicOnTheFly:
    """Stands in for :class:`superpixels.cache.SuperpixelCache` in a dataset: segments on every read.

    ``PretrainImages`` asks its cache for ``load(key_for(file bytes))``; here the key is the bytes themselves
    and ``load`` decodes them and runs SLIC, which is what a pipeline without the cache would do per sample.
    """

    def __init__(self, cfg: SuperpixelConfig) -> None:
        self.cfg = cfg

    def key_for(self, image_bytes: bytes) -> bytes:
        """The "key" is the encoded image itself."""
        return image_bytes

    def load(self, image_bytes: bytes) -> np.ndarray:
        """``[H,W]`` label map of the encoded image."""
        return compute_superpixels(read_rgb(image_bytes, "<benchmark image>"), self.cfg)


def base_config(args: argparse.Namespace, work: Path, arch: str, size: int, batch: int) -> PretrainConfig:
    """The reference recipe (schema defaults: 65,536-key queues, 2048-wide heads) at the benchmark's scale."""
    data = ["data.source=folder", f"data.root={args.images}"] if args.images else \
        ["data.source=builtin", f"data.builtin_dir={work / 'images'}"]
    return load_config(PretrainConfig, None, data + [
        "data.num_workers=0", f"superpixels.cache_dir={work / 'superpixels'}", "superpixels.workers=0",
        f"model.arch={arch}", f"model.split_bn_splits={math.gcd(batch, 8)}", f"aug.global_size={size}",
        f"aug.local_size={size // 2}", f"train.batch_size={batch}", f"train.out_dir={work}"])


def make_batch(dataset: PretrainImages, batch: int) -> dict[str, torch.Tensor]:
    """One collated batch of real training views (images reused cyclically when there are fewer)."""
    return collate_views([dataset[i % len(dataset)] for i in range(batch)])


def build_variants(base: PretrainConfig, paths: list[Path], accelerator: Accelerator) -> list[Variant]:
    """One prepared model, optimiser (as ``engine.train`` builds it), its queues and a batch per loss variant."""
    variants = []
    for name, overrides in VARIANTS.items():
        cfg = replace(base, overrides)
        torch.manual_seed(cfg.train.seed)
        model = MoCoPrior(cfg, world_size=accelerator.num_processes)
        optimizer = make_optimizer(cfg, model, scaled_lr(cfg, cfg.train.batch_size), accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        batch = make_batch(PretrainImages(paths, cfg, Path(cfg.superpixels.cache_dir)), cfg.train.batch_size)
        batch = to_device(batch, accelerator.device, False)
        variants.append(Variant(name, cfg, model, optimizer, make_queues(cfg, accelerator.device), batch))
    return variants


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(variants: list[Variant], accelerator: Accelerator, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per ``train_step`` of each variant, timed round robin after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:
        v.model.train()
    for round_ in range(warmup + steps):
        for v in variants:
            synchronize(accelerator.device)
            start = time.perf_counter()
            train_step(v.model, v.queues, v.batch, v.optimizer, accelerator, v.cfg)
            synchronize(accelerator.device)
            if round_ >= warmup:
                times[v.name].append(time.perf_counter() - start)
    return times


def queue_rows(cfg: PretrainConfig) -> list[int]:
    """Keys enqueued per step into each queue the config uses (global: B; local: B or B x pooled_regions)."""
    batch = cfg.train.batch_size
    rows = [batch] if cfg.uses_global else []
    if cfg.uses_local:
        rows.append(batch * (cfg.loss.pooled_regions if cfg.loss.local_mode == "pooled" else 1))
    return rows


def time_queue_work(cfg: PretrainConfig, device: torch.device, repeats: int) -> float:
    """Median seconds of InfoNCE forward + backward against each queue plus its enqueue, for one step."""
    gen = torch.Generator().manual_seed(0)
    rows = queue_rows(cfg)
    queues = [FeatureQueue(size, cfg.model.out_dim, gen).to(device) for size in
              ([cfg.queue.global_size] if cfg.uses_global else []) + ([cfg.queue.local_size] if cfg.uses_local else [])]
    keys = [F.normalize(torch.randn(n, cfg.model.out_dim, generator=gen), dim=1).to(device) for n in rows]
    samples = []
    for i in range(repeats + 2):
        queries = [F.normalize(torch.randn(n, cfg.model.out_dim, generator=gen), dim=1).to(device).requires_grad_()
                   for n in rows]
        synchronize(device)
        start = time.perf_counter()
        for q, k, queue in zip(queries, keys, queues):
            loss, _ = info_nce(q, k, queue.keys, cfg.loss.temperature)
            loss.backward()
            queue.enqueue(k)
        synchronize(device)
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_per_sample(dataset: PretrainImages, passes: int) -> float:
    """Mean seconds per ``dataset[i]`` over ``passes`` epochs (different augmentations each)."""
    start = time.perf_counter()
    for epoch in range(passes):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            dataset[i]
    return (time.perf_counter() - start) / (passes * len(dataset))


def time_superpixel_part(dataset: PretrainImages, passes: int) -> float:
    """Mean seconds to get one image's label map the way ``PretrainImages.__getitem__`` does."""
    raw = [Path(p).read_bytes() for p in dataset.paths]
    start = time.perf_counter()
    for _ in range(passes):
        for data in raw:
            dataset.cache.load(dataset.cache.key_for(data))
    return (time.perf_counter() - start) / (passes * len(raw))


def loader_times(base: PretrainConfig, paths: list[Path], passes: int) -> dict[str, dict[str, float]]:
    """Seconds per sample, cached vs on-the-fly SLIC: the superpixel part and whole samples of both modes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        out = {}
        for mode in ("patch", "pooled"):
            cached = PretrainImages(paths, replace(base, [f"loss.local_mode={mode}"]), Path(base.superpixels.cache_dir))
            fly = PretrainImages(paths, replace(base, [f"loss.local_mode={mode}"]), Path(base.superpixels.cache_dir))
            fly.cache = SlicOnTheFly(base.superpixels)
            if mode == "patch":
                out["superpixels only"] = {"cached": time_superpixel_part(cached, passes),
                                           "on the fly": time_superpixel_part(fly, passes)}
            out[f"whole sample, {mode}"] = {"cached": time_per_sample(cached, passes),
                                            "on the fly": time_per_sample(fly, passes)}
        return out
    finally:
        torch.set_num_threads(threads)


def jpeg_copies(paths: list[Path], folder: Path) -> list[Path]:
    """JPEG (quality 90) copies of ``paths``, for the modes that decode on the device (nvJPEG reads JPEG only)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = folder / (path.stem + ".jpg")
        if not target.is_file():
            Image.fromarray(read_rgb(path)).save(target, quality=90)
        out.append(target)
    return out


AUGMENT_MODES = {"worker": ["data.augment_on=worker"], "device": ["data.augment_on=device"],
                 "device + decode on device": ["data.augment_on=device", "data.decode_on=device"]}


def loader_modes(base: PretrainConfig, jpegs: list[Path], passes: int) -> dict[str, dict[str, float]]:
    """Seconds per sample of ``PretrainImages`` in each augment mode, per variant (1 thread, as a worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, dict[str, float]] = {}
        for variant, overrides in VARIANTS.items():
            for mode, mode_overrides in AUGMENT_MODES.items():
                cfg = replace(base, overrides + mode_overrides)
                dataset = PretrainImages(jpegs, cfg, Path(cfg.superpixels.cache_dir), mode_overrides[0].split("=")[1])
                out.setdefault(variant, {})[mode] = time_per_sample(dataset, passes)
        return out
    finally:
        torch.set_num_threads(threads)


def device_augment_share(base: PretrainConfig, jpegs: list[Path], accelerator: Accelerator,
                         repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of ``DeviceViews`` on one batch and of the variant's training step on its output."""
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = replace(base, overrides + ["data.augment_on=device"])
        torch.manual_seed(cfg.train.seed)
        model = MoCoPrior(cfg, world_size=accelerator.num_processes)
        optimizer = make_optimizer(cfg, model, scaled_lr(cfg, cfg.train.batch_size), accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        queues = make_queues(cfg, accelerator.device)
        raw = to_device(make_batch(PretrainImages(jpegs, cfg, Path(cfg.superpixels.cache_dir), "device"),
                                   cfg.train.batch_size), accelerator.device, False)
        views = DeviceViews(cfg, accelerator.device)
        aug, step = [], []
        for i in range(repeats + 1):
            synchronize(accelerator.device)
            start = time.perf_counter()
            batch = to_device(views(raw), accelerator.device, False)
            synchronize(accelerator.device)
            middle = time.perf_counter()
            train_step(model, queues, batch, optimizer, accelerator, cfg)
            synchronize(accelerator.device)
            if i:  # the first round warms up
                aug.append(middle - start)
                step.append(time.perf_counter() - middle)
        out[name] = {"augment_s": statistics.median(aug), "step_s": statistics.median(step)}
    return out


def end_to_end(args: argparse.Namespace, work: Path, jpegs: list[Path], accelerator: Accelerator) -> dict:
    """Images/s, GPU busy share and peak memory through the real loader, device views and training step.

    The dataset repeats the images so an epoch outlasts the run; every sample still gets its own views.
    """
    cuda = accelerator.device.type == "cuda"
    base = replace(base_config(args, work, args.e2e_arch, args.e2e_size, args.gpu_batch),
                   ["data.augment_on=device", f"data.decode_on={'device' if cuda else 'worker'}",
                    f"data.num_workers={args.gpu_workers}"])
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = replace(base, overrides)
        torch.manual_seed(cfg.train.seed)
        model = MoCoPrior(cfg, world_size=accelerator.num_processes)
        channels_last = uses_channels_last(cfg, accelerator.device, model.bn_mode)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(cfg, model, scaled_lr(cfg, cfg.train.batch_size), accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        queues = make_queues(cfg, accelerator.device)
        steps = args.warmup + args.steps
        repeats = math.ceil(steps * cfg.train.batch_size / len(jpegs)) + 1
        dataset = PretrainImages(jpegs * repeats, cfg, Path(cfg.superpixels.cache_dir), "device")
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.gpu_workers, pin_memory=cuda, collate_fn=collate_views,
                            persistent_workers=False, prefetch_factor=4 if args.gpu_workers else None)
        views = DeviceViews(cfg, accelerator.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # read after the run: no sync per step
        start = None
        for i, batch in enumerate(loader):
            if i == args.warmup:
                synchronize(accelerator.device)
                start = time.perf_counter()
            if i == steps:
                break
            timed = cuda and i >= args.warmup
            if timed:
                events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                events[-1][0].record()
            batch = to_device(views(to_device(batch, accelerator.device, channels_last)), accelerator.device,
                              channels_last)
            train_step(model, queues, batch, optimizer, accelerator, cfg)
            if timed:
                events[-1][1].record()
        synchronize(accelerator.device)
        wall = time.perf_counter() - start
        busy = sum(a.elapsed_time(b) for a, b in events) / 1000
        out[name] = {"images_per_s": args.steps * cfg.train.batch_size / wall,
                     "gpu_busy_share": busy / wall if cuda else None,
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        del model, optimizer, queues, loader
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_pretrain_"))
    base = base_config(args, work, args.arch, args.size, args.batch)
    load_start = os.getloadavg()[0]
    print(f"torch {torch.__version__}, device {accelerator.device}, CPU {cpu_name()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, load average {load_start:.2f}")
    print(f"{base.model.arch}, {base.aug.global_size} px views ({base.aug.local_size} px patches), "
          f"batch {base.train.batch_size}, queues {base.queue.global_size} x {base.model.out_dim}, "
          f"{args.steps} timed steps after {args.warmup} warm-up\n")

    paths = source_images(base, work)
    report = precompute([str(p) for p in paths], base.superpixels, base.superpixels.cache_dir, workers=0,
                        on_bad_image="skip", progress=False)
    paths = [p for p in paths if str(p) not in report.bad]
    print(f"{len(paths)} images ({len(report.bad)} without two usable superpixels left out); "
          f"superpixel cache: {report.summary()}\n")

    variants = build_variants(base, paths, accelerator)
    times = time_steps(variants, accelerator, args.steps, args.warmup)
    step = {name: statistics.median(t) for name, t in times.items()}
    reference = step["global-only (MoCo-v2)"]
    queue_s = {v.name: time_queue_work(v.cfg, accelerator.device, args.steps) for v in variants}
    del variants

    rows, results = [], {"step_s": step, "step_ratio": {}, "queue_share": {}}
    for name, seconds in step.items():
        ratio, share = seconds / reference, queue_s[name] / seconds
        results["step_ratio"][name], results["queue_share"][name] = ratio, share
        target = f"<= {TARGETS[name]:.2f}x: {verdict(ratio <= TARGETS[name])}" if name in TARGETS else "reference"
        rows.append([name, f"{1000 * seconds:.0f}", f"{1000 * min(times[name]):.0f}-{1000 * max(times[name]):.0f}",
                     f"{ratio:.2f}x", target, f"{1000 * queue_s[name]:.1f}",
                     f"{100 * share:.2f}% ({verdict(share < QUEUE_SHARE_TARGET)})"])
    print("Step time (forward + backward + SGD + enqueue, data loading excluded)\n")
    print(table(["variant", "median ms", "range ms", "vs global-only", "target", "queue ms",
                 "queue share (< 2%)"], rows))
    print(f"\nqueue ms: info_nce forward + backward against each {base.queue.global_size}-key queue the variant "
          f"uses, plus the enqueue, timed alone with the variant's rows (global: B; patch: B; pooled: "
          f"B x {base.loss.pooled_regions})")

    loader = loader_times(base, paths, args.loader_passes)
    results["loader_s_per_sample"] = loader
    rows = []
    for part, t in loader.items():
        speedup = t["on the fly"] / t["cached"]
        rows.append([part, f"{1000 * t['cached']:.1f}", f"{1000 * t['on the fly']:.1f}", f"{speedup:.1f}x",
                     verdict(speedup >= CACHE_SPEEDUP_TARGET)])
    print("\nData loader, ms per sample (1 thread, as a worker; cached superpixels vs SLIC on the fly, "
          f"n_segments {base.superpixels.n_segments}, original resolution)\n")
    print(table(["part", "cached", "on the fly", "speed-up", "target >= 10x"], rows))

    jpegs = jpeg_copies(paths, work / "jpeg")
    precompute([str(p) for p in jpegs], base.superpixels, base.superpixels.cache_dir, workers=0, on_bad_image="skip",
               progress=False)
    modes = loader_modes(base, jpegs, args.loader_passes)
    results["loader_modes_s_per_sample"] = modes
    names = list(AUGMENT_MODES)
    rows = [[variant] + [f"{1000 * t[m]:.2f}" for m in names] +
            [verdict(all(t[m] * 1000 <= DEVICE_LOADER_TARGET_MS for m in names[1:]))] for variant, t in modes.items()]
    print("\nLoader CPU ms per sample by data.augment_on (1 thread, as a worker; JPEG copies of the images)\n")
    print(table(["variant"] + names + [f"device modes <= {DEVICE_LOADER_TARGET_MS:.0f} ms"], rows))

    share = device_augment_share(base, jpegs, accelerator, args.steps)
    results["device_augment"] = share
    rows = [[n, f"{1000 * t['augment_s']:.1f}", f"{1000 * t['step_s']:.0f}",
             f"{100 * t['augment_s'] / t['step_s']:.1f}%"] for n, t in share.items()]
    print(f"\nDevice-side views (DeviceViews) per batch of {base.train.batch_size} on {accelerator.device}, against "
          f"the {base.model.arch} training step on the same batch\n")
    print(table(["variant", "views ms", "step ms", "views / step"], rows))

    if cuda or args.e2e_on_cpu:
        e2e = end_to_end(args, work, jpegs, accelerator)
        results["end_to_end"] = e2e
        where = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
        print(f"\nEnd to end on {where}: {args.e2e_arch}, {args.e2e_size} px, "
              f"{'bf16' if cuda else 'fp32'}, batch {args.gpu_batch}, {args.gpu_workers} loader workers\n")
        rows = [[n, f"{t['images_per_s']:.0f}",
                 f">= {GPU_TARGETS[n]}: {verdict(t['images_per_s'] >= GPU_TARGETS[n])}" if cuda else "-",
                 "-" if t["gpu_busy_share"] is None else f"{100 * t['gpu_busy_share']:.0f}%",
                 "-" if t["peak_memory_gib"] is None else f"{t['peak_memory_gib']:.1f}"] for n, t in e2e.items()]
        print(table(["variant", "images/s", "target", "GPU busy", "peak GiB"], rows))
    else:
        results["end_to_end"] = None
        print("\nCUDA not available: the end-to-end ResNet-50 / 224 px / bf16 part was skipped "
              "(benchmarks/gpu_check.sh runs it on a GPU).")
    load_end = os.getloadavg()[0]
    print(f"\nload average at start {load_start:.2f}, at end {load_end:.2f} (other processes share these cores)")
    results["environment"] = {"torch": torch.__version__, "cpu": cpu_name(), "cores": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "device": str(accelerator.device),
                              "load_average": [load_start, load_end], "args": vars(args)}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=224, help="global view side (patches: half of it)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (split-BN splits: gcd(batch, 8))")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--loader-passes", type=int, default=3, help="passes over the images per loader timing")
    parser.add_argument("--gpu-batch", type=int, default=256, help="batch of the end-to-end part")
    parser.add_argument("--gpu-workers", type=int, default=16, help="loader workers of the end-to-end part")
    parser.add_argument("--e2e-arch", default="resnet50", choices=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--e2e-size", type=int, default=224, help="view side of the end-to-end part")
    parser.add_argument("--e2e-on-cpu", action="store_true", help="run the end-to-end part without CUDA (dry run)")
    parser.add_argument("--images", default="", help="image folder (default: scikit-image's sample photos)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the steps (0: torch's default)")
    parser.add_argument("--work-dir", default="", help="where images and the superpixel cache go (default: temp)")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
