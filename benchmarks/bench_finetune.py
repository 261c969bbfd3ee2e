"""Stage-2 speed: evaluation episodes/s, training s/step, and the head's cost on top of the frozen backbones.

    python benchmarks/bench_finetune.py [--sizes 97 473] [--arch resnet50] [--steps 3] [--batch 4]
        [--eval-batch 16] [--json results.json]

For each input size it times, on synthetic tensors (data loading excluded):
  - eval: one 1-shot episode forward (batch 1, eval mode, no grad) -> episodes/s;
  - the three frozen backbone passes of that episode alone (query trunk, support trunk with masked layer4,
    prior trunk) -> the share the head, the two region maps and the FEM decoder add (target: <= 40%);
  - batched eval: ``--eval-batch`` 1-shot episodes in one forward (``eval.batch_size``, which gives the same
    numbers as 1, tests/test_eval_batch.py) -> episodes/s (target on one H100/H200 at 473 px, bf16: >= 100);
  - train: one SGD step (forward + backward + update) at ``--batch`` episodes -> s/step.
On a CUDA machine it also runs bf16 autocast and reports peak memory; on CPU that part is skipped.

Then the training loader by ``data.augment_on`` (``--loader-size``, 473 by default; skipped with
``--loader-episodes 0``): the CPU ms per 1-shot episode with ``num_workers=0`` (read and decode the JPEGs,
augment the query and the support, collate ``--batch`` episodes; one torch thread, as a worker), in ``worker``
mode (TrainTransform) and ``device`` mode (DeviceTrainTransform: draws, masks, the uint8 images), plus the bytes a
batch carries to the device, and the device-side cost of one batch (DeviceAugment: warp, blur, normalise of the
queries and supports) on the run's device. Data: the synthetic set at 500 x 500 (PASCAL-sized images) and, when
``../shared/data/fss-mini`` is there, its real photos (long side <= 320, so ``train_long_side`` = the crop size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.config import load_config
from fewshot.data.device_augment import DeviceAugment
from fewshot.data.episodes import make_episodes
from fewshot.data.fss import Fss1000
from fewshot.data.loader import EpisodeDataset, collate
from fewshot.data.synthetic import SyntheticFss
from fewshot.data.transforms import DeviceTrainTransform, TrainTransform
from fewshot.evaluate import to_device
from finetune.config import FinetuneConfig
from finetune.methods.qgnet import build_qgnet, qgnet_loss

SHARED = Path(os.environ.get("QGNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(arch: str, size: int, steps: int, batch: int, device: torch.device, amp: bool,
               eval_batch: int = 16) -> dict[str, float]:
    bins = "[60,30,15,8]" if size == 473 else "[1.0,0.5,0.25,0.125]"
    cfg = load_config(FinetuneConfig, None, [f"model.backbone={arch}", "model.backbone_weights=random",
                                             "model.prior=random", f"model.bins={bins}"])
    model = build_qgnet(cfg.model).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    g = torch.Generator().manual_seed(0)

    def episode(b: int):
        q = torch.randn(b, 3, size, size, generator=g).to(device)
        s = torch.randn(b, 1, 3, size, size, generator=g).to(device)
        m = (torch.rand(b, 1, size, size, generator=g) > 0.5).long().to(device)
        t = (torch.rand(b, size, size, generator=g) > 0.5).long().to(device)
        return q, s, m, t

    q, s, m, _ = episode(1)
    model.eval()
    with torch.no_grad(), autocast:
        full = timed(lambda: model(q, s, m), steps, device)

        def backbones():
            model.backbone(q)
            s2, s3 = model.backbone.to_layer3(s[:, 0])
            mask = torch.nn.functional.interpolate((m[:, 0] == 1).unsqueeze(1).float(), size=s3.shape[-2:],
                                                   mode="bilinear", align_corners=True)
            model.backbone.run_layer4(s3 * mask)
            model.prior(q)
        trunks = timed(backbones, steps, device)
        qe, se, me, _ = episode(eval_batch)
        batched = timed(lambda: model(qe, se, me), steps, device)

    model.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
    qb, sb, mb, tb = episode(batch)

    def step():
        with autocast:
            loss, _ = qgnet_loss(model(qb, sb, mb), tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_s = timed(step, steps, device)
    out = {"size": size, "eval_episode_s": full, "episodes_per_s": 1 / full, "backbones_s": trunks,
           "head_share": (full - trunks) / trunks, "train_s_per_step": train_s, "eval_batch": eval_batch,
           "batched_episodes_per_s": eval_batch / batched}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_loader(bench: Fss1000, size: int, long_side: int, episodes: int, batch: int, passes: int,
                 device: torch.device) -> dict[str, float]:
    """Loader CPU ms per 1-shot episode in each ``data.augment_on`` mode, batch bytes, and the device-side ms of
    one batch (see the module docstring)."""
    specs = make_episodes(bench, 1, episodes, seed=0)
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    for mode, kind in (("worker", TrainTransform), ("device", DeviceTrainTransform)):
        dataset = EpisodeDataset(bench, specs, kind(size, long_side=long_side), shot=1, seed=0)
        times, batches = [], []
        torch.set_num_threads(1)
        for _ in range(passes):
            start = time.perf_counter()
            batches = [collate([dataset[i] for i in range(j, j + batch)]) for j in range(0, episodes - batch + 1,
                                                                                       batch)]
            times.append((time.perf_counter() - start) / (len(batches) * batch))
        torch.set_num_threads(threads)
        out[f"{mode}_ms"] = 1000 * statistics.median(times)
        tensors = [v for v in batches[0].values() if isinstance(v, torch.Tensor)]
        out[f"{mode}_batch_mb"] = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        if mode == "device":
            augment = DeviceAugment(size)
            on_device = [to_device(b, device) for b in batches]
            out["device_side_ms"] = 1000 * timed(lambda: [augment(b) for b in on_device], passes,
                                                 device) / len(on_device)
            out["source_px"] = statistics.mean(int(b["device_sources"].shape[2] * b["device_sources"].shape[3])
                                               for b in batches)
    return out


def loader_sets(root: Path, size: int) -> list[tuple[str, Fss1000, int]]:
    """(name, benchmark, train_long_side) of the loader part: synthetic 500 px, and fss-mini when present."""
    sets = [("synthetic 500x500", SyntheticFss(root / "synthetic500", "train", 12, 6, 500), 0)]
    if (SHARED / "data" / "fss-mini").is_dir():
        sets.append(("fss-mini (real, long side <= 320)", Fss1000(SHARED / "data" / "fss-mini", "all"), size))
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[97, 473], help="model sizes (none: loader only)")
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet101", "mobilenet_v2"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="training episodes per step")
    parser.add_argument("--eval-batch", type=int, default=16, help="episodes per forward of the batched eval")
    parser.add_argument("--loader-size", type=int, default=473, help="training crop of the loader part")
    parser.add_argument("--loader-episodes", type=int, default=32, help="episodes per loader pass (0 = skip)")
    parser.add_argument("--loader-passes", type=int, default=3, help="loader passes (median)")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args()
    results = []
    torch.manual_seed(0)
    runs = [("cpu" if not torch.cuda.is_available() else "cuda", False)]
    if torch.cuda.is_available():
        runs.append(("cuda", True))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, arch {args.arch} (+ ResNet-50 prior), "
          f"1-shot, train batch {args.batch}")
    print("| device | precision | size | eval s/episode | episodes/s | 3 backbone passes s | head+maps+FEM share "
          f"(target <= 40%) | episodes/s, batch {args.eval_batch} | train s/step |" +
          (" peak GiB |" if torch.cuda.is_available() else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if torch.cuda.is_available() else ""))
    for dev, amp in runs:
        for size in args.sizes:
            r = bench_size(args.arch, size, args.steps, args.batch, torch.device(dev), amp, args.eval_batch)
            results.append({"device": dev, "precision": "bf16" if amp else "fp32", **r})
            extra = f" {r['peak_mem_gib']:.1f} |" if "peak_mem_gib" in r else ""
            verdict = "met" if r["head_share"] <= 0.40 else "MISSED"
            print(f"| {dev} | {'bf16' if amp else 'fp32'} | {size} | {r['eval_episode_s']:.3f} | "
                  f"{r['episodes_per_s']:.2f} | {r['backbones_s']:.3f} | {100 * r['head_share']:.0f}% ({verdict}) | "
                  f"{r['batched_episodes_per_s']:.2f} | {r['train_s_per_step']:.2f} |{extra}")
    if not torch.cuda.is_available():
        print("no CUDA device: the mixed-precision / peak-memory rows were not measured")
    loader = []
    if args.loader_episodes:
        dev = torch.device(runs[0][0])
        step_s = {r["size"]: r["train_s_per_step"] for r in results if r["precision"] == "fp32"}
        print(f"\nTraining loader by data.augment_on at {args.loader_size} px, 1-shot, num_workers=0 (1 thread), "
              f"batch {args.batch}; device side on {dev}")
        print("| data | `worker` ms/episode | `device` ms/episode | batch MB worker / device | device side ms/batch |"
              " share of a train step |")
        print("|---|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory() as tmp:
            for name, bench, long_side in loader_sets(Path(tmp), args.loader_size):
                r = bench_loader(bench, args.loader_size, long_side, args.loader_episodes, args.batch,
                                 args.loader_passes, dev)
                loader.append({"data": name, **r})
                share = (f"{100 * r['device_side_ms'] / 1000 / step_s[args.loader_size]:.1f}%"
                         if args.loader_size in step_s else "n/a")
                print(f"| {name} | {r['worker_ms']:.1f} | {r['device_ms']:.1f} | {r['worker_batch_mb']:.1f} / "
                      f"{r['device_batch_mb']:.1f} | {r['device_side_ms']:.0f} | {share} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "arch": args.arch, "runs": results, "loader": loader}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
