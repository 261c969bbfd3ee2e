"""Generalization diagnostics in minutes: small heads trained on cached frozen features of a run's episodes.

    python -m finetune.tools.head_probe --config configs/finetune/smoke_real-mix_mnv2.yaml --out runs/head_probe \
        --head features --sampling pairs --steps 1000
    python -m finetune.tools.head_probe ... --train-on test     # a ceiling, never a result (see below)

What a learned head can add over the training-free ``prototype`` baseline, asked without the cost of a full
run: every image of the config's training, validation and test episodes goes once through the frozen backbone
(the evaluation resize of ``data.eval_size``, HSNet protocol; the only augmentation is a horizontal flip of the
cached query features), and a small head then trains on those features at a few steps per second on a CPU.

* ``--head maps``: class-agnostic inputs only: per tap (layer2, layer3, layer4), the query's cosine to the
  support's foreground and background prototypes and its highest cosine to any support foreground / background
  pixel (12 maps). ``--head features`` adds the query's own layer3 features through a 1x1 reduction.
  Both add their output to the layer3 prototype logits and start at zero, so step 0 *is* the baseline.
* ``--sampling pairs`` draws training episodes as the run does (in proportion to each source's (image, class)
  pairs); ``classes`` draws a training class uniformly first. ``--classes N`` keeps N training classes (a
  seeded choice): the gain over the baseline as a function of class diversity; ``--train-sources a,b`` trains
  on those sources' episodes only (e.g. fss-mini alone against every source).
* Model selection uses the validation classes only (every ``--val-every`` steps, step 0 included); the test
  classes are scored once, with the selected and with the last weights, on the episode lists of
  ``eval.seeds`` (``data.*`` as the config says, so the lists are the ones ``finetune.evaluate`` draws).
* ``--train-on test`` trains on episodes of the *test* classes (drawn with other seeds than the scored lists,
  so their images overlap): what these features could give if the head had been taught the test classes
  themselves. It is a diagnostic ceiling for docs/generalization.md, labelled as such in the output.

Writes ``<out>/features_<size>_<digest>.pt`` (the cache, reused by later calls with the same config, overrides and
episode counts), ``<out>/<label>.json`` and appends rows to ``<out>/results.md``. The probe's ``prototype`` row is
the full evaluation's (same episodes, same metric); its heads are not the shipped methods, so a probe row says
what a head on these features can learn, and a trained model's own table says what the method does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cli import user_errors
from common.config import load_config
from fewshot.data.base import EpisodeSpec, FewShotBenchmark
from fewshot.data.episodes import epoch_episodes, make_episodes
from fewshot.data.sources import KEY_SEP, build_splits
from fewshot.data.transforms import EvalTransform
from fewshot.metrics import SegmentationMeter
from finetune.config import FinetuneConfig
from finetune.methods.prototype import masked_average, prototype_logits
from finetune.methods.qgnet import balanced_cross_entropy
from finetune.model.backbones import FrozenBackbone, build_backbone
from finetune.model.region_maps import masked_max_cosine

TAPS = ("layer2", "layer3", "layer4")
PROTO_TAP = 1  # the baseline's layer: layer3 (stride 8), the best prototype layer of docs/generalization.md
SCALE = 20.0   # PANet's cosine temperature, as model.prototype_scale


@dataclass
class Episodes:
    """Episode lists by role: training (cache split, episode) pairs, validation, test lists per source and seed."""

    train: list[tuple[str, EpisodeSpec]]
    val: list[EpisodeSpec]
    test: dict[str, list[list[EpisodeSpec]]]


class FeatureCache:
    """Frozen taps of every image and the class masks of every (image, class) pair the episodes use.

    ``feats[(split, key)]`` = three half-precision tensors ``[C_l, h, w]``; ``masks[(split, key, class)]`` =
    uint8 ``[S, S]`` in {0, 1, 255} at the evaluation size.
    """

    def __init__(self, feats: dict, masks: dict) -> None:
        self.feats, self.masks = feats, masks

    @classmethod
    def build(cls, backbone: FrozenBackbone, size: int, lists: dict[str, tuple[FewShotBenchmark, list]]
              ) -> FeatureCache:
        """Read and encode every image of ``lists`` (split -> (benchmark, episodes)) once."""
        transform, feats, masks = EvalTransform(size, "hsnet"), {}, {}
        for split, (bench, episodes) in lists.items():
            for e in episodes:
                for key in (e.query, *e.supports):
                    if (split, key, e.class_id) in masks:
                        continue
                    image, mask = bench.load(bench.sample(key), e.class_id)
                    x, y = transform(image, mask)
                    masks[(split, key, e.class_id)] = y.to(torch.uint8)
                    if (split, key) not in feats:
                        with torch.no_grad():
                            feats[(split, key)] = tuple(t[0].half() for t in backbone(x[None]))
        return cls(feats, masks)

    def batch(self, split: str, episodes: list[EpisodeSpec], flip: Tensor | None = None
              ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """-> query taps ``[B,C_l,h,w]`` x3, first-support taps x3, query mask ``[B,S,S]``, support mask ``[B,S,S]``.

        ``flip [B]`` bool: mirror those queries (features and mask) left-right.
        """
        def taps(keys: list[str]) -> list[Tensor]:
            return [torch.stack([self.feats[(split, k)][i] for k in keys]).float() for i in range(len(TAPS))]

        qf, sf = taps([e.query for e in episodes]), taps([e.supports[0] for e in episodes])
        qm = torch.stack([self.masks[(split, e.query, e.class_id)] for e in episodes]).long()
        sm = torch.stack([self.masks[(split, e.supports[0], e.class_id)] for e in episodes]).long()
        if flip is not None:
            qf = [torch.where(flip[:, None, None, None], f.flip(-1), f) for f in qf]
            qm = torch.where(flip[:, None, None], qm.flip(-1), qm)
        return qf, sf, qm, sm


def support_weights(mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``mask [B,S,S]`` -> foreground and background weights ``[B,1,h,w]`` (bilinear, as the prototype baseline)."""
    fg = F.interpolate((mask == 1).float()[:, None], size=size, mode="bilinear", align_corners=True)
    bg = F.interpolate((mask == 0).float()[:, None], size=size, mode="bilinear", align_corners=True)
    return fg, bg


def baseline_logits(qf: list[Tensor], sf: list[Tensor], sm: Tensor) -> Tensor:
    """The ``prototype`` method's logits on layer3: ``[B,2,h,w]`` (background, foreground)."""
    q, s = qf[PROTO_TAP], sf[PROTO_TAP]
    fg, bg = support_weights(sm, q.shape[-2:])
    return prototype_logits(q, masked_average(s, fg), masked_average(s, bg), SCALE)


def episode_maps(qf: list[Tensor], sf: list[Tensor], sm: Tensor) -> Tensor:
    """Class-agnostic query maps ``[B,12,h,w]``: per tap, cosine to the fg / bg prototype and highest cosine to
    any support fg / bg pixel (support pixels weighted by the resized mask; weight 0 = a zero vector = cosine 0)."""
    out = []
    for q, s in zip(qf, sf):
        b, c, h, w = q.shape
        fg, bg = support_weights(sm, (h, w))
        out.append(prototype_logits(q, masked_average(s, fg), masked_average(s, bg), 1.0).flip(1))
        dense = [masked_max_cosine(q.flatten(2), (s * m).flatten(2)).view(b, 1, h, w) for m in (fg, bg)]
        out.append(torch.cat(dense, 1))
    return torch.cat(out, 1)


class ProbeHead(nn.Module):
    """Three 3x3 convolutions (the middle one dilated) on the episode maps (and optionally reduced layer3
    features) whose output is added to the baseline's logits; the last layer starts at zero."""

    def __init__(self, features: int = 0, width: int = 32, dropout: float = 0.5, feature_channels: int = 96) -> None:
        super().__init__()
        self.reduce = (nn.Sequential(nn.Conv2d(feature_channels, features, 1), nn.ReLU(), nn.Dropout2d(dropout))
                       if features else None)
        self.net = nn.Sequential(nn.Conv2d(4 * len(TAPS) + features, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, qf: list[Tensor], sf: list[Tensor], sm: Tensor) -> Tensor:
        """-> logits ``[B,2,h,w]``."""
        x = episode_maps(qf, sf, sm)
        if self.reduce is not None:
            x = torch.cat([x, self.reduce(qf[PROTO_TAP])], 1)
        return baseline_logits(qf, sf, sm) + self.net(x)


def score(head: nn.Module | None, cache: FeatureCache, split: str, episodes: list[EpisodeSpec], size: int,
          chunk: int = 50) -> float:
    """Class-accumulated foreground mIoU (%) of ``head`` (None = the baseline) at the input size (HSNet)."""
    meter = SegmentationMeter(sorted({e.class_id for e in episodes}))
    for i in range(0, len(episodes), chunk):
        part = episodes[i:i + chunk]
        qf, sf, qm, sm = cache.batch(split, part)
        with torch.no_grad():
            logits = baseline_logits(qf, sf, sm) if head is None else head(qf, sf, sm)
        pred = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True).argmax(1)
        for j, e in enumerate(part):
            meter.update(pred[j], qm[j], e.class_id)
    return 100.0 * meter.miou()


def test_row(head: nn.Module | None, cache: FeatureCache, episodes: Episodes, size: int) -> dict[str, float]:
    """Per source, the mean over the scored seeds; ``mean`` over sources."""
    row = {name: sum(score(head, cache, f"test:{name}", lst, size) for lst in lists) / len(lists)
           for name, lists in episodes.test.items()}
    row["mean"] = sum(row.values()) / len(row)
    return row


def draw_episodes(cfg: FinetuneConfig, epochs: int, train_on_test: bool
                  ) -> tuple[Episodes, dict[str, tuple[FewShotBenchmark, list]]]:
    """The config's episode lists, and the (benchmark, episodes) each cache split needs."""
    splits = build_splits(cfg.data)
    if splits.val is None:
        raise ValueError("the config has no validation classes (data.val_classes / data.val_class_fraction): "
                         "model selection would have to look at test classes")
    n = cfg.train.episodes_per_epoch
    train = [("train", e) for epoch in range(epochs)
             for e in epoch_episodes(splits.train, cfg.shot, cfg.train.seed, epoch, n, cfg.data.query_order)]
    val = make_episodes(splits.val, cfg.shot, cfg.train.val_episodes, cfg.train.seed, "random")
    test = {name: [make_episodes(b, cfg.shot, cfg.eval.episodes, s, cfg.data.query_order) for s in cfg.eval.seeds]
            for name, b in splits.test.items()}
    lists = {"train": (splits.train, [e for _, e in train]), "val": (splits.val, val)}
    lists.update({f"test:{name}": (b, [e for lst in test[name] for e in lst]) for name, b in splits.test.items()})
    if train_on_test:  # the ceiling: episodes of the test classes from seeds the scored lists do not use
        extra = {name: [e for s in range(1000, 1000 + epochs)
                        for e in make_episodes(b, cfg.shot, max(n // len(splits.test), 100), s, "random")]
                 for name, b in splits.test.items()}
        for name, b in splits.test.items():
            lists[f"test:{name}"] = (b, lists[f"test:{name}"][1] + extra[name])
        train = [(f"test:{name}", e) for name, lst in extra.items() for e in lst]
    return Episodes(train, val, test), lists


def train_head(head: ProbeHead, cache: FeatureCache, episodes: Episodes, size: int, steps: int, batch: int,
               lr: float, weight_decay: float, sampling: str, classes: int, val_every: int, seed: int,
               train_sources: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """AdamW on balanced cross-entropy; returns the selected (best validation, step 0 included) and last rows."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = episodes.train
    if train_sources:
        pool = [(s, e) for s, e in pool if e.query.split(KEY_SEP)[0] in train_sources]
        if not pool:
            raise ValueError(f"--train-sources {','.join(train_sources)}: no training episode comes from them")
    if classes:
        names = sorted({e.class_id for _, e in pool})
        if classes > len(names):
            raise ValueError(f"--classes {classes}: the training episodes have {len(names)} classes")
        keep = set(random.Random(classes).sample(names, classes))
        pool = [(s, e) for s, e in pool if e.class_id in keep]
    by_class: dict[int, list] = {}
    for item in pool:
        by_class.setdefault(item[1].class_id, []).append(item)
    class_list = sorted(by_class)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def validate() -> float:
        head.eval()
        value = score(head, cache, "val", episodes.val, size)
        head.train()
        return value

    best = (validate(), 0, {k: v.clone() for k, v in head.state_dict().items()})
    log(f"step 0: validation mIoU {best[0]:.1f}")
    curve = [(0, best[0])]
    for step in range(1, steps + 1):
        items = (rng.sample(pool, batch) if sampling == "pairs"
                 else [rng.choice(by_class[rng.choice(class_list)]) for _ in range(batch)])
        flip = torch.tensor([rng.random() < 0.5 for _ in items])
        parts = [cache.batch(split, [e], flip[j:j + 1]) for j, (split, e) in enumerate(items)]
        qf = [torch.cat([p[0][i] for p in parts]) for i in range(len(TAPS))]
        sf = [torch.cat([p[1][i] for p in parts]) for i in range(len(TAPS))]
        qm, sm = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
        logits = F.interpolate(head(qf, sf, sm), size=qm.shape[-2:], mode="bilinear", align_corners=True)
        loss = balanced_cross_entropy(logits, qm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % val_every == 0 or step == steps:
            value = validate()
            curve.append((step, value))
            log(f"step {step}: loss {loss.item():.3f}, validation mIoU {value:.1f}")
            if value > best[0]:
                best = (value, step, {k: v.clone() for k, v in head.state_dict().items()})
    head.eval()
    last = test_row(head, cache, episodes, size)
    head.load_state_dict(best[2])
    return {"selected_step": best[1], "validation_curve": curve, "last": last,
            "selected": test_row(head, cache, episodes, size), "training_classes": len(class_list)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a stage-2 config with validation classes (data.sources ...)")
    p.add_argument("--out", required=True, help="folder of the feature cache and the results")
    p.add_argument("--head", choices=("maps", "features"), default="features")
    p.add_argument("--sampling", choices=("pairs", "classes"), default="pairs")
    p.add_argument("--classes", type=int, default=0, help="keep this many training classes (0 = all)")
    p.add_argument("--train-sources", default="", help="comma-separated source names to train on (default: all)")
    p.add_argument("--train-on", choices=("train", "test"), default="train",
                   help="test = the diagnostic ceiling (trains on test classes; never a result)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--epochs", type=int, default=12, help="training epochs of episodes to cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.eval_size=321")
    args = p.parse_args(argv)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    size, out = cfg.data.eval_size, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    episodes, lists = draw_episodes(cfg, args.epochs, args.train_on == "test")
    digest = hashlib.sha1(json.dumps(sorted((s, len(e)) for s, (_, e) in lists.items())).encode()
                          + Path(args.config).read_bytes() + " ".join(args.overrides).encode()).hexdigest()[:10]
    cache_path = out / f"features_{size}_{digest}.pt"
    if cache_path.exists():
        cache = FeatureCache(*torch.load(cache_path, weights_only=True))
    else:
        backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights, cfg.model.deep_stem,
                                  freeze_bn_stats=True).eval()
        cache = FeatureCache.build(backbone, size, lists)
        torch.save((cache.feats, cache.masks), cache_path)
    baseline = test_row(None, cache, episodes, size)
    head = ProbeHead(features=64 if args.head == "features" else 0)
    result = train_head(head, cache, episodes, size, args.steps, args.batch, args.lr, args.weight_decay,
                        args.sampling, args.classes, args.val_every, args.seed,
                        [n for n in args.train_sources.split(",") if n])
    label = (f"{args.head}_{args.sampling}_c{args.classes or 'all'}_{args.train_on}"
             f"{'_' + args.train_sources.replace(',', '+') if args.train_sources else ''}_{args.steps}steps_{size}px"
             f"_seed{args.seed}")
    result.update({"label": label, "args": vars(args), "baseline": baseline, "size": size,
                   "ceiling_only": args.train_on == "test"})
    (out / f"{label}.json").write_text(json.dumps(result, indent=1))
    sources = list(baseline)
    table = out / "results.md"
    if not table.exists():
        table.write_text("| run | selected step | " + " | ".join(sources) + " |\n|---|---|"
                         + "---|" * len(sources) + "\n")
    with table.open("a") as f:
        f.write(f"| prototype ({size} px) | - | " + " | ".join(f"{baseline[s]:.1f}" for s in sources) + " |\n")
        if args.train_on == "test":  # a ceiling is the last weights: selecting it on validation classes means nothing
            f.write(f"| {label} (CEILING: trained on test classes) | last ({args.steps}) | "
                    + " | ".join(f"{result['last'][s]:.1f}" for s in sources) + " |\n")
        else:
            f.write(f"| {label} | {result['selected_step']} | "
                    + " | ".join(f"{result['selected'][s]:.1f}" for s in sources) + " |\n")
    print(f"prototype: {baseline['mean']:.1f}  {label}: selected {result['selected']['mean']:.1f} "
          f"(step {result['selected_step']}), last {result['last']['mean']:.1f}; {out / 'results.md'}")
    return result


if __name__ == "__main__":
    with user_errors():
        sys.exit(0 if main() else 1)
