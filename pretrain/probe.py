"""A label-efficient check of a prior extractor without stage 2: superpixel kNN few-shot segmentation.

    python -m pretrain.probe EXPORT.safetensors --data FSS_DIR [--episodes 100 --seed 0 --size 224
        --neighbors 5 --shot 1 --n-segments 80 --layer mid] [--arch mobilenet_v2] [--no-compare-random]
        [--out results.json]

Episodes come from the stage-2 code: every class folder of ``--data`` (``fewshot.data.fss.Fss1000``,
``split="all"``; masks binarised at 128) and ``fewshot.data.episodes.make_episodes`` with the HSNet order
(class uniform, query uniform in the class, ``shot`` other images of the class as supports), a pure function
of (folder listing, shot, count, seed). Per episode:

1. every image is squashed to ``size x size`` (mask: nearest) and cut into SLIC superpixels
   (:func:`superpixels.segment.compute_superpixels`, ``n_segments`` ~ 80: finer than stage 1's 32 so that
   superpixels follow object outlines);
2. the frozen network's feature map is upsampled (nearest) to ``size x size`` and mean-pooled per superpixel,
   then L2-normalised (bilinear upsampling scored the same on fss-mini at C x S x S memory). ``layer=mid``
   (default) is the stride-16 map - ResNet ``layer3``, MobileNetV2 ``features[:14]`` - 14x14 cells at 224 px,
   so most superpixels own whole cells; ``layer=last`` is the stride-32 map stage 1 trains (ResNet
   ``layer4``, MobileNetV2 ``features``), 7x7 at 224 px, and scored far lower with ImageNet MobileNetV2
   (fss-mini, 100 episodes: mIoU 27 vs 49; random init 22 vs 20);
3. a support superpixel is foreground when most of its non-ignored pixels are; each query superpixel takes the
   majority label of its ``neighbors`` nearest support superpixels (cosine, faiss ``IndexFlatIP``, on the
   GPUs when faiss sees any; a tie is background) and the prediction is the union of foreground superpixels;
4. :class:`fewshot.metrics.SegmentationMeter` accumulates foreground IoU per class (sum of intersections /
   sum of unions over the class's episodes; mIoU = their mean over classes) and FB-IoU, at ``size x size``.

``--compare-random`` (on by default) runs a randomly initialised network of the same architecture (torch seed
``seed``) on the same episodes and prints both side by side as a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor, nn

from common.config import field
from common.errors import DataError, WeightsError
from common.weights import ARCHS, export_arch, load_torchvision_weights, torchvision_net, trunk_features
from fewshot.data.base import EpisodeSpec, FewShotBenchmark
from fewshot.data.episodes import episodes_hash, make_episodes
from fewshot.data.fss import Fss1000
from fewshot.metrics import SegmentationMeter
from superpixels.segment import SuperpixelConfig, compute_superpixels


@dataclass
class ProbeConfig:
    """What the probe measures and how; every field is also a command-line flag (``--n-segments``)."""

    episodes: int = field(100, help="number of episodes (class drawn uniformly, then query and supports)")
    seed: int = field(0, help="seed of the episode draw and of the random-init comparison network")
    shot: int = field(1, help="support images per episode")
    size: int = field(224, help="images and masks are squashed to size x size; IoU is measured there")
    neighbors: int = field(5, help="k of the kNN vote (odd avoids ties; a tie counts as background)")
    n_segments: int = field(80, help="SLIC superpixels per image (approximate)")
    compactness: float = field(10.0, help="SLIC compactness")
    layer: Literal["mid", "last"] = field(
        "mid", help="mid: stride-16 map (ResNet layer3, MobileNetV2 features[:14]); last: the stride-32 map "
                    "stage 1 trains (ResNet layer4, MobileNetV2 features)")

    def validate(self) -> None:
        if self.episodes < 1 or self.shot < 1 or self.neighbors < 1:
            raise ValueError("episodes, shot and neighbors must be >= 1")
        if self.size < 32 or self.n_segments < 2:
            raise ValueError(f"size must be >= 32 and n_segments >= 2, got {self.size}, {self.n_segments}")


# --------------------------------------------------------------------------------------------------
# networks


def load_prior(path: str | Path, arch: str | None = None) -> tuple[nn.Module, str]:
    """A torchvision network holding the exported weights, in eval mode, and its arch.

    ``arch`` must agree with the file's metadata when both name one; one of the two must. The file must
    load with exactly the classifier missing (:func:`common.weights.load_into`).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a .safetensors export (written by python -m pretrain.export)")
    recorded = export_arch(path) if path.is_file() else None
    if arch and recorded and arch != recorded:
        raise WeightsError(f"{path}: --arch {arch} but the export records arch={recorded}")
    arch = arch or recorded
    if arch is None:
        raise WeightsError(f"{path}: the file records no architecture; pass --arch ({', '.join(ARCHS)})")
    net = torchvision_net(arch)
    load_torchvision_weights(net, arch, path, hint="export one with `python -m pretrain.export RUN_DIR --out FILE`")
    return net.eval(), arch


def random_prior(arch: str, seed: int) -> nn.Module:
    """torchvision's default initialisation of ``arch`` under ``torch.manual_seed(seed)``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(torchvision.models, arch)(weights=None).eval()


@torch.no_grad()
def probe_features(net: nn.Module, images: Tensor, layer: str) -> Tensor:
    """``[B,3,S,S] -> [B,C,S/16,S/16]`` (``mid``) or ``[B,C,S/32,S/32]`` (``last``), see the module doc."""
    return trunk_features(net, images, last=4 if layer == "last" else 3)


def superpixel_embeddings(features: Tensor, labels: Tensor) -> Tensor:
    """Mean feature of every superpixel over its pixels, the feature map nearest-upsampled to the labels.

    Computed without the upsampled map: superpixel n's feature is the mean of the cells it touches, each
    weighted by how many of its pixels fall in that cell (pixel (y, x) lies in cell (y*h//S, x*w//S)).

    Args:
        features: ``[C,h,w]`` one image's feature map.
        labels: ``[S,S]`` int64 dense superpixel ids ``0..N-1``.

    Returns:
        ``[N,C]`` float32, L2-normalised.
    """
    channels, h, w = features.shape
    rows = torch.arange(labels.shape[0]) * h // labels.shape[0]
    cols = torch.arange(labels.shape[1]) * w // labels.shape[1]
    cell = (rows[:, None] * w + cols[None, :]).flatten()  # [S*S]
    num = int(labels.max()) + 1
    counts = torch.bincount(labels.flatten() * (h * w) + cell, minlength=num * h * w).view(num, h * w).float()
    pooled = (counts / counts.sum(dim=1, keepdim=True)) @ features.reshape(channels, h * w).float().T  # [N,C]
    return F.normalize(pooled, dim=1)


# --------------------------------------------------------------------------------------------------
# labelling and scoring


def support_foreground(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Majority vote of the support mask inside each superpixel.

    Args:
        labels: ``[S,S]`` dense ids ``0..N-1``.
        mask: ``[S,S]`` uint8, 1 = foreground, 0 = background, 255 = ignore (not counted).

    Returns:
        ``[N]`` bool: more than half of the superpixel's counted pixels are foreground.
    """
    counted = mask != 255
    num = int(labels.max()) + 1
    fg = np.bincount(labels[counted & (mask == 1)], minlength=num)
    total = np.bincount(labels[counted], minlength=num)
    return 2 * fg > total


def knn_vote(support: np.ndarray, support_fg: np.ndarray, query: np.ndarray, neighbors: int) -> np.ndarray:
    """Label each query row by the majority of its nearest support rows (inner product = cosine here).

    Args:
        support: ``[M,D]`` L2-normalised support embeddings.
        support_fg: ``[M]`` bool support labels.
        query: ``[N,D]`` L2-normalised query embeddings.
        neighbors: k (clipped to M); a tie is background.

    Returns:
        ``[N]`` bool foreground decisions.
    """
    import faiss  # only the probe needs faiss

    k = min(neighbors, support.shape[0])
    index = faiss.IndexFlatIP(support.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(support, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(query, dtype=np.float32), k)  # [N,k]
    votes = support_fg[nearest].sum(axis=1)
    return 2 * votes > k


# --------------------------------------------------------------------------------------------------
# images and evaluation


class ProbeImages:
    """Reads, squashes and segments each image of a benchmark once (shared by every network probed)."""

    def __init__(self, benchmark: FewShotBenchmark, cfg: ProbeConfig) -> None:
        self.benchmark = benchmark
        self.size = cfg.size
        self.sp_cfg = SuperpixelConfig(method="slic", n_segments=cfg.n_segments, compactness=cfg.compactness)
        self.mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
        self._items: dict[tuple[str, int], tuple[Tensor, np.ndarray, np.ndarray]] = {}

    def item(self, key: str, class_id: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """``(image [3,S,S] normalised float32, superpixels [S,S] int64, mask [S,S] uint8 0/1/255)``."""
        if (key, class_id) not in self._items:
            rgb, mask = self.benchmark.load(self.benchmark.sample(key), class_id)
            size = (self.size, self.size)
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
            mask = np.array(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
            labels = compute_superpixels(rgb, self.sp_cfg).astype(np.int64)
            image = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255 - self.mean) / self.std
            self._items[key, class_id] = (image, labels, mask)
        return self._items[key, class_id]


def evaluate_prior(net: nn.Module, episodes: list[EpisodeSpec], images: ProbeImages, layer: str,
                   neighbors: int) -> dict[str, object]:
    """Run the superpixel kNN probe of one network over ``episodes``.

    Returns:
        ``{"miou", "fb_iou", "per_class": {class name: IoU}}`` (class-accumulated, see the module doc).
    """
    cache: dict[str, np.ndarray] = {}

    def embeddings(key: str, class_id: int) -> np.ndarray:  # [N,C] per image, computed once per network
        if key not in cache:
            image, labels, _ = images.item(key, class_id)
            features = probe_features(net, image[None], layer)[0]
            cache[key] = superpixel_embeddings(features, torch.from_numpy(labels)).numpy()
        return cache[key]

    bench = images.benchmark
    meter = SegmentationMeter(bench.class_ids)
    for ep in episodes:
        support_emb = np.concatenate([embeddings(k, ep.class_id) for k in ep.supports])
        support_fg = np.concatenate([support_foreground(*images.item(k, ep.class_id)[1:]) for k in ep.supports])
        _, query_labels, query_mask = images.item(ep.query, ep.class_id)
        fg = knn_vote(support_emb, support_fg, embeddings(ep.query, ep.class_id), neighbors)
        meter.update(fg[query_labels].astype(np.uint8), query_mask, ep.class_id)
    return {"miou": meter.miou(), "fb_iou": meter.fbiou(),
            "per_class": {bench.class_names[c]: iou for c, iou in meter.per_class_iou().items()}}


def markdown_table(results: dict[str, dict[str, object]]) -> str:
    """Rows: classes, then mIoU and FB-IoU; one column per evaluated network (IoU in %)."""
    names = list(results)
    classes = sorted({c for r in results.values() for c in r["per_class"]})  # type: ignore[union-attr]
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{100 * r['per_class'][c]:.1f}" for r in results.values()) + " |")
    for key, label in (("miou", "**mIoU**"), ("fb_iou", "**FB-IoU**")):
        lines.append(f"| {label} | " + " | ".join(f"**{100 * r[key]:.1f}**" for r in results.values()) + " |")
    return "\n".join(lines)


def run_probe(export: str | Path, data: str | Path, cfg: ProbeConfig, arch: str | None = None,
              compare_random: bool = True) -> dict[str, object]:
    """Load the export, draw the episodes, score it (and a random init of the same arch).

    Returns a JSON-ready dict: ``{"export", "arch", "data", "config", "episodes", "results": {name: scores}}``.
    """
    net, arch = load_prior(export, arch)
    bench = Fss1000(data, split="all")
    if not any(len(s) > cfg.shot for s in bench.samples_by_class.values()):
        raise DataError(f"--data {data}: no class folder holds {cfg.shot + 1} image/mask pairs; the probe reads the "
                        "FSS-1000 layout <class>/<n>.jpg + <n>.png (one folder per class, masks 0/255)")
    episodes = make_episodes(bench, cfg.shot, cfg.episodes, cfg.seed, query_order="random")
    images = ProbeImages(bench, cfg)
    results = {f"export ({arch})": evaluate_prior(net, episodes, images, cfg.layer, cfg.neighbors)}
    if compare_random:
        results[f"random init ({arch})"] = evaluate_prior(random_prior(arch, cfg.seed), episodes, images,
                                                          cfg.layer, cfg.neighbors)
    return {"export": str(export), "arch": arch, "data": str(data), "config": dataclasses.asdict(cfg),
            "episodes": len(episodes), "episodes_hash": episodes_hash(episodes), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="prior-extractor export (.safetensors, torchvision names)")
    parser.add_argument("--data", required=True, help="FSS-1000-layout folder: <class>/<n>.jpg + <n>.png")
    parser.add_argument("--arch", choices=list(ARCHS), help="architecture when the file has no 'arch' metadata")
    parser.add_argument("--compare-random", action=argparse.BooleanOptionalAction, default=True,
                        help="also score a random-init network of the same arch on the same episodes (default: on)")
    parser.add_argument("--out", help="write the results as JSON here")
    hints = get_type_hints(ProbeConfig)
    for f in dataclasses.fields(ProbeConfig):
        kind = hints[f.name]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})",
                            **({"type": kind} if kind in (int, float) else {"choices": get_args(kind)}))
    args = parser.parse_args(argv)
    cfg = ProbeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeConfig)})
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        report = run_probe(args.export, args.data, cfg, args.arch, args.compare_random)
    except (OSError, ValueError, RuntimeError) as err:  # DataError is a RuntimeError; all name the file
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{report['episodes']} episodes, {cfg.shot}-shot, seed {cfg.seed}, {cfg.size} px, layer {cfg.layer}, "
          f"SLIC {cfg.n_segments}, k={cfg.neighbors} ({time.perf_counter() - start:.0f} s)\n")
    print(markdown_table(report["results"]))  # type: ignore[arg-type]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
