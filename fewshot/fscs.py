"""Integrative few-shot classification and segmentation (FS-CS) over any 1-way segmenter (iFSL protocol).

Kang & Cho, "Integrative Few-Shot Learning for Classification and Segmentation", CVPR 2022: given N support
classes (K shots each) and a query that may hold any subset of them, say which are present and segment those.
Any registered 1-way method becomes an FS-CS learner by the iFSL rule, so this module is protocol only:

* **Episodes** (:func:`make_fscs_episodes`): a query, then N distinct support classes. Rule ``per-way`` (the
  default): for every way, with probability 1/2 a class present in the query, otherwise one with no pixel in
  it; rule ``ifsl``: the reference sampler (the query's class weighted 1/2, the others sharing 1/2, N drawn
  without replacement). The list is a pure function of (benchmark split, way, shot, count, seed, order, rule)
  and is saved as JSON with its hash.
* **Inference** (:func:`run_ways`, :func:`classify`, :func:`merge_ways`, :func:`segment`): the 1-way model runs
  once per way (the ways are stacked in the batch); class n is present iff ``max_p P_fg^n(p) >= 0.5``; the
  background is the mean of the ways' background probabilities; the label map is the argmax over 1 + N; pixels
  won by a class called absent are background.
* **Metrics** (:class:`FscsMeter`): ER (the share of episodes whose every presence call is right), per-way
  accuracy, mIoU over class ids (each way's intersection and union added to its class, summed over episodes
  and processes), FB-IoU.
* **Results** (:func:`evaluate_fscs`, :func:`evaluate_fscs_seeds`): episodes sharded over processes,
  ``results.json`` + ``.md``, PNG grids with every way's foreground map and its presence call, and
  ``python -m fewshot.fscs results.json ...`` for tables of ER / mIoU across methods and ways.

Ground truth comes from the loaded labels, not from the index: a way's class is present iff at least one pixel
of the query's label is that class (at original resolution), as in the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import draw_segmentation_masks
from tqdm import tqdm

from common.errors import DataError
from common.io import write_json, write_text
from common.runlog import markdown_table
from fewshot.data.base import IGNORE_INDEX, FewShotBenchmark, Sample
from fewshot.data.fss import Fss1000
from fewshot.data.loader import EpisodeDataset, Transform
from fewshot.data.semantic import SemanticFolder
from fewshot.data.sources import ID_STRIDE, KEY_SEP, ClassSubset, MultiSource
from fewshot.data.transforms import EvalTransform
from fewshot.evaluate import EvalSpec, check_skipped, merged_result, prediction_at_label, to_device
from fewshot.metrics import EPS
from fewshot.vis import heatmap, overlay, save_grid, to_uint8

try:  # optional, as in fewshot.data.registry
    from fewshot.data.crossdomain import CrossDomainBenchmark
    SINGLE_LABEL: tuple[type, ...] = (Fss1000, CrossDomainBenchmark)
except ModuleNotFoundError as err:
    if err.name != "fewshot.data.crossdomain":
        raise
    SINGLE_LABEL = (Fss1000,)

FORMAT = "qgnet-fscs-episodes/1"
THRESHOLD = 0.5  # iFSL: a class is present when its foreground probability reaches 1/2 somewhere
Rule = Literal["per-way", "ifsl"]
RULES = ("per-way", "ifsl")
WAY_COLOURS = ("#ff3355", "#2f8fff", "#20c060", "#ffaa00", "#b050ff", "#00c8c8")


@dataclass(frozen=True)
class FscsEpisode:
    """An N-way K-shot FS-CS episode by reference.

    Attributes:
        query: Sample.key of the query (never one of the supports).
        supports: ``[N][K]`` support keys, way by way.
        class_ids: the N distinct support classes; way n is class ``class_ids[n]`` (label value ``n + 1``).
    """

    query: str
    supports: tuple[tuple[str, ...], ...]
    class_ids: tuple[int, ...]


@dataclass(frozen=True)
class FscsSpec(EvalSpec):
    """:class:`~fewshot.evaluate.EvalSpec` plus the number of ways and the support-class rule."""

    way: int = 1
    rule: str = "per-way"


# --------------------------------------------------------------------------------------------------
# what the index says about an image


def _part(bench: MultiSource, key: str) -> tuple[int, FewShotBenchmark, str]:
    name, _, inner = key.partition(KEY_SEP)
    for i, (part_name, _, part) in enumerate(bench.parts):
        if part_name == name:
            return i, part, inner
    raise KeyError(key)


def image_classes(bench: FewShotBenchmark, key: str) -> list[int]:
    """The split's classes with at least one pixel in image ``key``, as far as the index knows.

    Unlike ``query_classes``, a semantic folder's classes below its size filter count: an *absent* support
    class must have no pixel at all, or the episode's negative would be a positive in the label.
    """
    if isinstance(bench, MultiSource):
        i, part, inner = _part(bench, key)
        return [ID_STRIDE * (i + 1) + c for c in image_classes(part, inner)]
    if isinstance(bench, ClassSubset):
        keep = set(bench.class_ids)
        return [c for c in image_classes(bench.base, key) if c in keep]
    if isinstance(bench, SemanticFolder):
        counts = bench.index[key]["counts"]
        return [c for c in bench.class_ids if counts.get(str(c), 0) > 0]
    return list(bench.query_classes(key))


def single_label(bench: FewShotBenchmark, key: str) -> bool:
    """Whether ``load(sample, c)`` returns the image's one mask whatever ``c`` is (FSS-1000 layouts and the
    cross-domain sets): then a class the image is not indexed under must be given an empty mask, not loaded."""
    if isinstance(bench, MultiSource):
        return single_label(_part(bench, key)[1], key.partition(KEY_SEP)[2])
    if isinstance(bench, ClassSubset):
        return single_label(bench.base, key)
    return isinstance(bench, SINGLE_LABEL)


# --------------------------------------------------------------------------------------------------
# episodes


def _weighted_pick(rng: random.Random, items: list[int], weights: list[float]) -> int:
    """One index of ``items`` with probability proportional to ``weights`` (one ``rng.random()`` draw)."""
    u, acc = rng.random() * sum(weights), 0.0
    for j, w in enumerate(weights):
        acc += w
        if u < acc:
            return j
    return len(items) - 1


def draw_ways(rng: random.Random, present: list[int], absent: list[int], way: int, rule: Rule = "per-way",
              anchor: int | None = None) -> list[int]:
    """The N support classes of one episode.

    Args:
        present: the query's classes (those an FS-S episode may ask about) that can give K supports;
            ``absent``: classes with no pixel in the query.
        rule: ``per-way``: each way is a present class with probability 1/2, else an absent one (drawn from the
            other pool when the wanted one is used up: the per-way rate then moves off 1/2, and the results
            report the share of ways present); ``ifsl``: ``anchor`` weighted 1/2, every other class
            ``1 / (2 (C - 1))``, drawn without replacement (numpy's ``choice(p=..., replace=False)`` rule).
    """
    if len(present) + len(absent) < way:
        raise ValueError(f"{way} ways need {way} classes, only {len(present) + len(absent)} can give supports")
    chosen: list[int] = []
    if rule == "per-way":
        for _ in range(way):
            want_present = rng.random() < 0.5
            pool_p = [c for c in present if c not in chosen]
            pool_a = [c for c in absent if c not in chosen]
            pool = pool_p if (want_present and pool_p) or not pool_a else pool_a
            chosen.append(rng.choice(pool))
        return chosen
    if rule != "ifsl":
        raise ValueError(f"FS-CS rule must be one of {', '.join(RULES)}, got {rule!r}")
    pool = present + absent
    if anchor is None or anchor not in pool:
        raise ValueError("rule 'ifsl' needs the query's anchor class among the candidates")
    other = 0.5 / max(len(pool) - 1, 1)
    weights = [0.5 if c == anchor else other for c in pool]
    for _ in range(way):
        j = _weighted_pick(rng, pool, weights)
        chosen.append(pool.pop(j))
        weights.pop(j)
    return chosen


def make_fscs_episodes(benchmark: FewShotBenchmark, way: int, shot: int, n_episodes: int, seed: int,
                       query_order: str = "random", rule: Rule = "per-way") -> list[FscsEpisode]:
    """``n_episodes`` N-way K-shot FS-CS episodes (cycle / shuffle with ``n_episodes=0``: one per image).

    Queries are drawn as :func:`fewshot.data.episodes.make_episodes` draws them (``random``: a class uniform
    over the split, the query uniform among its images; ``cycle`` / ``shuffle``: the image list in order or
    seeded order), among images with at least one class that has K other images. Then :func:`draw_ways`, then
    K supports per way, uniformly without replacement, never the query. Several sources: drawn per source
    (episodes never mix datasets), counts split by source weight, then shuffled together.
    """
    if way < 1 or shot < 1:
        raise ValueError(f"way and shot must be >= 1, got way={way}, shot={shot}")
    if isinstance(benchmark, MultiSource):
        return _multi_source_episodes(benchmark, way, shot, n_episodes, seed, query_order, rule)
    rng = random.Random(seed)
    keys_of = {c: [s.key for s in benchmark.samples_by_class.get(c, [])] for c in benchmark.class_ids}
    members = {c: set(k) for c, k in keys_of.items()}

    def supported(c: int, query: str) -> bool:
        return len(keys_of.get(c, ())) - (query in members.get(c, ())) >= shot

    usable = [c for c in benchmark.class_ids if len(keys_of[c]) >= shot]
    if len(usable) < way:
        raise ValueError(f"{benchmark!r}: {way}-way {shot}-shot episodes need {way} classes with {shot} images, "
                         f"{len(usable)} have them")

    def episode(query: str, anchor: int) -> FscsEpisode | None:
        # present: the classes an FS-S episode may ask about for this query (its size-filter convention);
        # absent: no pixel at all. A class with a few pixels below a semantic folder's filter is neither.
        there = set(image_classes(benchmark, query))
        present = [c for c in benchmark.query_classes(query) if supported(c, query)]
        absent = [c for c in usable if c not in there]
        if len(present) + len(absent) < way:  # the query is one of the few images of its other classes
            return None
        classes = draw_ways(rng, present, absent, way, rule, anchor)
        supports = tuple(tuple(rng.sample([k for k in keys_of[c] if k != query], shot)) for c in classes)
        return FscsEpisode(query, supports, tuple(classes))

    if query_order == "random":
        if n_episodes < 1:
            raise ValueError("query_order='random' needs n_episodes >= 1")
        anchors = [c for c in benchmark.class_ids if len(keys_of[c]) > shot]
        if not anchors:
            raise ValueError(f"{benchmark!r}: no class has {shot + 1} images, cannot draw {shot}-shot episodes")
        out: list[FscsEpisode] = []
        for _ in range(100 * n_episodes):  # a query that cannot fill N ways is redrawn (bounded, never hangs)
            c = rng.choice(anchors)
            e = episode(rng.choice(keys_of[c]), c)
            if e is not None:
                out.append(e)
                if len(out) == n_episodes:
                    return out
        raise ValueError(f"{benchmark!r}: too few queries can fill {way} ways of {shot} supports")
    if query_order not in ("cycle", "shuffle"):
        raise ValueError(f"query_order must be random, cycle or shuffle, got {query_order!r}")
    keys = benchmark.image_keys()
    if query_order == "shuffle":
        rng.shuffle(keys)
    target = n_episodes or len(keys)
    out, skipped, i = [], 0, 0
    while len(out) < target:
        if i == len(keys) and not out:
            raise ValueError(f"{benchmark!r}: no image has a class with {shot} other images; no episode possible")
        key = keys[i % len(keys)]
        i += 1
        choices = [c for c in benchmark.query_classes(key) if supported(c, key)]
        e = episode(key, rng.choice(choices)) if choices else None
        if e is None:
            skipped += i <= len(keys)  # count each image once, not on every wrap-around
            continue
        out.append(e)
    if skipped:
        warnings.warn(f"{benchmark!r}: {skipped} of {len(keys)} query images have no class with {shot} other "
                      f"images and were passed over", stacklevel=2)
    return out


def _multi_source_episodes(bench: MultiSource, way: int, shot: int, n_episodes: int, seed: int,
                           query_order: str, rule: Rule) -> list[FscsEpisode]:
    """Per-source draws (largest-remainder split of ``n_episodes`` by weight), keys and ids made global.

    A source with fewer than N classes of K images cannot give an N-way episode: it is left out, with a
    warning (e.g. a validation split that holds one class of a source)."""
    def fits(part: FewShotBenchmark) -> bool:
        return sum(len(part.samples_by_class.get(c, [])) >= shot for c in part.class_ids) >= way

    unfit = [name for name, _, part in bench.parts if not fits(part)]
    if len(unfit) == len(bench.parts):
        raise ValueError(f"{bench!r}: no source has {way} classes with {shot} images for {way}-way episodes")
    if unfit:
        warnings.warn(f"{bench!r}: sources {', '.join(unfit)} have fewer than {way} classes with {shot} images "
                      f"and give no {way}-way episode", stacklevel=3)
    weights = [0.0 if name in unfit else w if w > 0 else float(b.num_pairs()) for name, w, b in bench.parts]
    counts = [0] * len(bench.parts)
    if n_episodes:
        exact = [n_episodes * w / sum(weights) for w in weights]
        counts = [int(x) for x in exact]
        for j in sorted(range(len(exact)), key=lambda j: counts[j] - exact[j])[:n_episodes - sum(counts)]:
            counts[j] += 1
    out = []
    for i, ((name, _, part), count) in enumerate(zip(bench.parts, counts)):
        if name in unfit or (n_episodes and not count):
            continue
        own_seed = int.from_bytes(hashlib.sha1(f"fscs:{seed}:{name}".encode()).digest()[:4], "big")
        for e in make_fscs_episodes(part, way, shot, count, own_seed, query_order, rule):
            out.append(FscsEpisode(f"{name}{KEY_SEP}{e.query}",
                                   tuple(tuple(f"{name}{KEY_SEP}{k}" for k in way_keys) for way_keys in e.supports),
                                   tuple(ID_STRIDE * (i + 1) + c for c in e.class_ids)))
    random.Random(seed).shuffle(out)
    return out


def index_presence(benchmark: FewShotBenchmark, episodes: list[FscsEpisode]) -> list[list[bool]]:
    """``[episode][way]``: whether the index says the way's class has pixels in the query (no image is read)."""
    return [[c in set(image_classes(benchmark, e.query)) for c in e.class_ids] for e in episodes]


def _rows(episodes: list[FscsEpisode]) -> list[list[Any]]:
    return [[e.query, [list(s) for s in e.supports], list(e.class_ids)] for e in episodes]


def fscs_episodes_hash(episodes: list[FscsEpisode]) -> str:
    """16 hex digits of the SHA-256 of the list's canonical JSON: equal lists, equal hashes."""
    return hashlib.sha256(json.dumps(_rows(episodes), separators=(",", ":")).encode()).hexdigest()[:16]


def save_fscs_episodes(episodes: list[FscsEpisode], path: str | Path, meta: dict | None = None) -> str:
    """Write the list (with ``meta``: benchmark, fold, way, shot, seed, rule, ...) as JSON; returns its hash."""
    digest = fscs_episodes_hash(episodes)
    write_json(path, {"format": FORMAT, "hash": digest, "count": len(episodes), "meta": meta or {},
                      "episodes": _rows(episodes)}, indent=None)
    return digest


def load_fscs_episodes(path: str | Path) -> list[FscsEpisode]:
    """Read a list written by :func:`save_fscs_episodes`; a wrong format or hash raises ValueError."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
        episodes = [FscsEpisode(str(q), tuple(tuple(str(k) for k in s) for s in sup), tuple(int(c) for c in cls))
                    for q, sup, cls in body["episodes"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a readable FS-CS episode list ({err})") from err
    if body.get("format") != FORMAT:
        raise ValueError(f"{path}: format {body.get('format')!r}, expected {FORMAT!r} (an FS-S list is "
                         f"read by fewshot.data.episodes.load_episodes)")
    if fscs_episodes_hash(episodes) != body.get("hash"):
        raise ValueError(f"{path}: content hash {fscs_episodes_hash(episodes)} does not match the stored "
                         f"{body.get('hash')} (the file was edited or truncated)")
    return episodes


# --------------------------------------------------------------------------------------------------
# episodes as tensors

FSCS_STACKED = ("query", "query_label", "supports", "support_masks", "class_ids", "presence", "content",
                "episode_index")


class FscsDataset(EpisodeDataset):
    """Item ``i`` is FS-CS episode ``episodes[i]`` loaded and transformed.

    Returns a dict: ``query`` float ``[3,S,S]``; ``query_label`` int64 ``[S,S]`` (0 = background, n + 1 = way
    n's class, 255 = ignore); ``supports`` ``[N,K,3,S,S]``; ``support_masks`` int64 ``[N,K,S,S]`` (0/1/255);
    ``class_ids`` int64 ``[N]``; ``presence`` bool ``[N]`` (ground truth, at original resolution);
    ``content`` int64 ``[2]`` (height, width of the image on the canvas, the rest is padding);
    ``episode_index``; ``query_key``; ``support_keys`` ``[N][K]``; ``query_label_orig`` uint8 ``[H0,W0]``;
    ``orig_size``. The augmentation of image ``slot`` (0 = query, ``1 + n K + k`` = support k of way n) is
    seeded by ``(seed, epoch, index, slot)``, so items do not depend on the number of workers.
    """

    def __init__(self, benchmark: FewShotBenchmark, episodes: list[FscsEpisode], transform: Transform,
                 way: int | None = None, shot: int | None = None, seed: int = 0, epoch: int = 0,
                 on_bad_sample: str = "error") -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be error or skip, got {on_bad_sample!r}")
        for i, e in enumerate(episodes):
            if (way is not None and len(e.class_ids) != way) or len(e.supports) != len(e.class_ids) or \
                    (shot is not None and any(len(s) != shot for s in e.supports)):
                raise ValueError(f"episode {i} has {len(e.class_ids)} ways x {[len(s) for s in e.supports]} "
                                 f"supports, expected {way} x {shot}")
        # EpisodeDataset's checks do not fit N-way episodes: its state is set here, its methods are inherited
        self.benchmark, self.episodes, self.transform = benchmark, episodes, transform
        self.seed, self.epoch, self.on_bad_sample = seed, epoch, on_bad_sample
        self.reader = EpisodeDataset(benchmark, [], transform)  # its support checks, reused

    # __len__, __getitem__ (the bad-input skip) and rng come from EpisodeDataset; only the episode differs

    def build(self, index: int) -> dict[str, Any]:
        """Load, check and transform one episode (raises DataError on bad input)."""
        episode = self.episodes[index]
        image, label = self.read_query(episode.query, episode.class_ids)
        ways = len(episode.class_ids)
        presence = torch.tensor([bool((label == n + 1).any()) for n in range(ways)])
        query, query_label = self.transform(image, label, self.rng(index, 0))
        size = query_label.shape[-1]
        content = self.transform.content_size(*label.shape) if isinstance(self.transform, EvalTransform) \
            else (size, size)
        supports, masks = [], []
        for n, (c, keys) in enumerate(zip(episode.class_ids, episode.supports)):
            for k, key in enumerate(keys):
                s_image, s_mask, _ = self.reader.read(key, c, "support")
                s_image, s_mask = self.transform(s_image, s_mask, self.rng(index, 1 + n * len(keys) + k))
                supports.append(s_image)
                masks.append(s_mask)
        shot = len(episode.supports[0])
        return {"query": query, "query_label": query_label,
                "supports": torch.stack(supports).view(ways, shot, *supports[0].shape),
                "support_masks": torch.stack(masks).view(ways, shot, *masks[0].shape),
                "class_ids": torch.tensor(episode.class_ids), "presence": presence,
                "content": torch.tensor(content), "episode_index": torch.tensor(index),
                "query_key": episode.query, "support_keys": [list(s) for s in episode.supports],
                "query_label_orig": torch.from_numpy(label), "orig_size": tuple(label.shape)}

    def read_query(self, key: str, class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H,W,3]`` uint8 and label ``[H,W]`` uint8: way n's class -> n + 1, ignore -> 255, else 0.

        Later ways win where two classes' masks overlap (COCO instances may); a pixel that some way marks
        ignore (PASCAL boundaries, COCO crowd regions of a way's class) and none claims is ignore.
        """
        bench = self.benchmark
        try:
            sample = bench.sample(key)
        except KeyError:
            raise DataError(f"query key {key!r} is not in {bench!r}") from None
        known = image_classes(bench, key)
        loadable = [c for c in class_ids if c in known] if single_label(bench, key) else list(class_ids)
        image, masks = None, {}
        for c in loadable:
            image, masks[c] = self._load(sample, c)
        if image is None:  # a single-label layout and no way is the image's class: only its pixels are needed
            own = known or bench.query_classes(key)
            if not own:
                raise DataError(f"{sample.image_path}: the query is indexed under no class of {bench!r}")
            image, mask = self._load(sample, own[0])
            masks = {c: np.zeros_like(mask) for c in class_ids}
        shape = image.shape[:2]
        label = np.zeros(shape, np.uint8)
        ignore = np.zeros(shape, bool)
        for n, c in enumerate(class_ids):
            mask = masks.get(c)
            if mask is None:
                continue
            ignore |= mask == IGNORE_INDEX
            label[mask == 1] = n + 1
        label[(label == 0) & ignore] = IGNORE_INDEX
        return image, label

    def _load(self, sample: Sample, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.benchmark.load(sample, class_id)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
            raise DataError(f"{sample.image_path}: image {image.shape} and mask {mask.shape} ({sample.mask_path}) "
                            f"do not match")
        values = set(np.unique(mask).tolist())
        if not values <= {0, 1, IGNORE_INDEX}:
            raise DataError(f"{sample.mask_path}: mask values {sorted(values)} outside {{0, 1, 255}} for class "
                            f"{class_id}")
        return image, mask


def fscs_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the fixed-size fields (all episodes of a batch have the same N and K); keys and original labels
    stay lists; ``batch["size"]`` counts the kept episodes, ``batch["skipped"]`` lists the dropped ones."""
    kept = [x for x in items if "skipped" not in x]
    batch: dict[str, Any] = {"size": len(kept), "skipped": [x["skipped"] for x in items if "skipped" in x]}
    if kept:
        for name in FSCS_STACKED:
            batch[name] = torch.stack([x[name] for x in kept])
        for name in ("query_key", "support_keys", "query_label_orig", "orig_size"):
            batch[name] = [x[name] for x in kept]
    return batch


# --------------------------------------------------------------------------------------------------
# the iFSL inference rule


def run_ways(model: Callable, query: Tensor, supports: Tensor, support_masks: Tensor
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The 1-way segmenter once per way, the ways stacked in the batch (one forward, so DDP sees one call).

    Args:
        query ``[B,3,S,S]``, supports ``[B,N,K,3,S,S]``, support_masks ``[B,N,K,S,S]``.

    Returns:
        logits ``[B,N,2,S,S]`` and the method's maps, each ``[B,N,1,h,w]``. With frozen (eval-mode) batch
        statistics this equals N separate calls; a method that normalises over the batch in training sees
        the N ways of an episode together.
    """
    b, n = supports.shape[:2]
    q = query.unsqueeze(1).expand(b, n, *query.shape[1:]).flatten(0, 1)
    out = model(q, supports.flatten(0, 1), support_masks.flatten(0, 1))
    logits = out.logits.view(b, n, *out.logits.shape[1:])
    return logits, {k: v.view(b, n, *v.shape[1:]) for k, v in out.maps.items()}


def content_mask(content: Tensor, size: int) -> Tensor:
    """``content [B,2]`` (height, width of the image at the canvas's top-left) -> bool ``[B,S,S]``."""
    r = torch.arange(size, device=content.device)
    return (r.view(1, -1, 1) < content[:, 0].view(-1, 1, 1)) & (r.view(1, 1, -1) < content[:, 1].view(-1, 1, 1))


def classify(fg: Tensor, valid: Tensor | None = None, threshold: float = THRESHOLD) -> tuple[Tensor, Tensor]:
    """Presence per way: ``fg [B,N,S,S]`` foreground probabilities, ``valid [B,S,S]`` the image's pixels (the
    canvas padding is not the image) -> (scores ``max_p fg`` ``[B,N]``, present ``scores >= threshold``)."""
    if valid is not None:
        fg = fg.masked_fill(~valid[:, None], 0.0)
    scores = fg.flatten(2).amax(-1)
    return scores, scores >= threshold


def merge_ways(probs: Tensor) -> Tensor:
    """``probs [B,N,2,S,S]`` per-way (background, foreground) -> ``[B,1+N,S,S]``: the mean of the ways'
    background probabilities, then each way's foreground probability."""
    return torch.cat([probs[:, :, 0].mean(1, keepdim=True), probs[:, :, 1]], dim=1)


def drop_absent(pred: Tensor, present: Tensor) -> Tensor:
    """``pred [...]`` labels in 0..N, ``present [N]`` bool (one episode) -> pixels of absent ways set to 0."""
    keep = torch.cat([present.new_ones(1), present.bool()])
    return torch.where(keep[pred], pred, torch.zeros_like(pred))


def segment(merged: Tensor, present: Tensor) -> Tensor:
    """``merged [B,1+N,S,S]``, ``present [B,N]`` -> labels ``[B,S,S]`` in 0..N: argmax over 1 + N, then
    pixels won by a class called absent are background."""
    pred = merged.argmax(1)
    return torch.stack([drop_absent(p, m) for p, m in zip(pred, present)])


@dataclass
class FscsPrediction:
    """The iFSL answer for a batch: ``probs [B,N,2,S,S]``, ``merged [B,1+N,S,S]``, ``scores [B,N]``,
    ``present [B,N]`` bool, ``label [B,S,S]`` (0..N) and the method's maps ``[B,N,1,h,w]``."""

    probs: Tensor
    merged: Tensor
    scores: Tensor
    present: Tensor
    label: Tensor
    maps: dict[str, Tensor]


def predict(model: Callable, query: Tensor, supports: Tensor, support_masks: Tensor,
            valid: Tensor | None = None) -> FscsPrediction:
    """:func:`run_ways`, then :func:`classify`, :func:`merge_ways` and :func:`segment` (shapes as there)."""
    logits, maps = run_ways(model, query, supports, support_masks)
    probs = logits.float().softmax(dim=2)
    scores, present = classify(probs[:, :, 1], valid)
    merged = merge_ways(probs)
    return FscsPrediction(probs, merged, scores, present, segment(merged, present), maps)


# --------------------------------------------------------------------------------------------------
# metrics


class FscsMeter:
    """Accumulates FS-CS episode statistics; mergeable across processes through a float64 ``state`` vector.

    Per class (rows of ``class_ids``): foreground intersection, union, and the episodes it was a way in; a
    background row (intersection, union, episodes); and the classification counts (episodes, exactly right
    episodes, right way calls, ways, ways present in the ground truth).
    """

    def __init__(self, class_ids: list[int], ignore_index: int = IGNORE_INDEX) -> None:
        self.class_ids = [int(c) for c in class_ids]
        self.row = {c: i for i, c in enumerate(self.class_ids)}
        self.ignore_index = ignore_index
        self.seg = torch.zeros(len(self.class_ids) + 1, 3, dtype=torch.float64)
        self.cls = torch.zeros(5, dtype=torch.float64)

    def update(self, pred: Tensor, target: Tensor, class_ids: list[int] | Tensor, present: Tensor,
               truth: Tensor) -> dict[str, Any]:
        """Add one episode.

        Args:
            pred: ``[H,W]`` labels in 0..N (absent ways already dropped); target ``[H,W]`` in 0..N or ignore.
            class_ids: the N ways' classes; present / truth: ``[N]`` bool, predicted and true presence.

        Returns:
            ``{"exact": bool, "iou": [per way IoU, NaN where the way's class is in neither]}``.
        """
        pred, target = torch.as_tensor(pred).cpu(), torch.as_tensor(target).cpu()
        present, truth = torch.as_tensor(present).cpu().bool(), torch.as_tensor(truth).cpu().bool()
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        ious = []
        for n, c in enumerate([int(c) for c in class_ids]):
            if c not in self.row:
                raise ValueError(f"class {c} is not one of the meter's classes {self.class_ids}")
            p, t = (pred == n + 1) & valid, (target == n + 1) & valid
            inter, union = int((p & t).sum()), int((p | t).sum())
            self.seg[self.row[c]] += torch.tensor([inter, union, 1], dtype=torch.float64)
            ious.append(inter / union if union else float("nan"))
        p, t = (pred == 0) & valid, (target == 0) & valid
        self.seg[-1] += torch.tensor([int((p & t).sum()), int((p | t).sum()), 1], dtype=torch.float64)
        right = present == truth
        exact = bool(right.all())
        self.cls += torch.tensor([1, exact, int(right.sum()), len(right), int(truth.sum())], dtype=torch.float64)
        return {"exact": exact, "iou": ious}

    def per_class_iou(self) -> dict[int, float]:
        """``class -> IoU`` over the classes with a non-empty union (a class only ever absent and never
        predicted has no IoU to report; the reference counts it 0, which only matters with very few episodes)."""
        return {c: float(self.seg[i, 0] / self.seg[i, 1]) for c, i in self.row.items() if self.seg[i, 1] > 0}

    def miou(self) -> float:
        ious = list(self.per_class_iou().values())
        return float(np.mean(ious)) if ious else 0.0

    def fbiou(self) -> float:
        """Mean of the foreground IoU (all ways' classes together) and the background IoU."""
        fg = self.seg[:-1, :2].sum(0)
        bg = self.seg[-1, :2]
        return float((fg[0] / (fg[1] + EPS) + bg[0] / (bg[1] + EPS)) / 2)

    def er(self) -> float:
        """Exact ratio: the share of episodes whose every presence call is right."""
        return float(self.cls[1] / self.cls[0]) if self.cls[0] else 0.0

    def summary(self) -> dict[str, Any]:
        episodes, _, right, ways, positives = self.cls.tolist()
        return {"er": self.er(), "miou": self.miou(), "fbiou": self.fbiou(), "episodes": int(episodes),
                "way_accuracy": right / ways if ways else 0.0, "positive_rate": positives / ways if ways else 0.0,
                "per_class_iou": {str(c): v for c, v in self.per_class_iou().items()},
                "episodes_per_class": {str(c): int(self.seg[i, 2]) for c, i in self.row.items()}}

    def state(self) -> Tensor:
        """Everything accumulated, one float64 vector (for ``accelerator.gather``)."""
        return torch.cat([self.seg.flatten(), self.cls])

    def load_state(self, state: Tensor) -> FscsMeter:
        """Replace the statistics by ``state`` summed over any leading copies (a gathered ``[P, L]``)."""
        state = torch.as_tensor(state, dtype=torch.float64).cpu().reshape(-1, self.seg.numel() + self.cls.numel())
        total = state.sum(0)
        self.seg = total[:self.seg.numel()].view_as(self.seg).clone()
        self.cls = total[self.seg.numel():].clone()
        return self

    def merge(self, other: FscsMeter) -> FscsMeter:
        if other.class_ids != self.class_ids:
            raise ValueError("can only merge meters over the same classes")
        self.seg += other.seg
        self.cls += other.cls
        return self


# --------------------------------------------------------------------------------------------------
# pictures


def _caption(panel: Tensor, lines: list[str], colour: str = "#000000") -> Tensor:
    """Text lines drawn on a white band at the top of ``panel [3,H,W]`` uint8."""
    image = Image.fromarray(panel.permute(1, 2, 0).numpy().copy())
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, 11 * len(lines) + 1), fill=(255, 255, 255))
    for j, line in enumerate(lines):
        draw.text((2, 11 * j), line, fill=colour)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _labels(image: Tensor, label: Tensor, ways: int) -> Tensor:
    """``image [3,S,S]`` uint8 with label values 1..N drawn in the ways' colours."""
    masks = torch.stack([(label == n + 1).cpu() for n in range(ways)])
    return draw_segmentation_masks(image, masks, alpha=0.5, colors=[WAY_COLOURS[n % len(WAY_COLOURS)]
                                                                    for n in range(ways)])


def fscs_row(supports: Tensor, support_masks: Tensor, query: Tensor, target: Tensor, pred: Tensor, fg: Tensor,
             scores: Tensor, present: Tensor, truth: Tensor, names: list[str]) -> list[Tensor]:
    """Panels of one episode, all ``[3,S,S]`` uint8: query | ground truth | prediction, then per way its
    supports and its foreground probability map captioned with ``max P``, the call and whether it is right.

    Args:
        supports ``[N,K,3,S,S]``, support_masks ``[N,K,S,S]``, query ``[3,S,S]``, target / pred ``[S,S]``
        (0..N, 255), fg ``[N,S,S]``, scores / present / truth ``[N]``, names: the ways' class names.
    """
    ways, size = supports.shape[0], tuple(query.shape[-2:])
    q = to_uint8(query)
    panels = [q, _caption(_labels(q, target, ways), ["ground truth"]),
              _caption(_labels(q, pred, ways), ["prediction"])]
    for n in range(ways):
        colour = WAY_COLOURS[n % len(WAY_COLOURS)]
        for s, m in zip(supports[n], support_masks[n]):
            panels.append(_caption(overlay(to_uint8(s), m, colour), [f"way {n + 1}: {names[n]}"[:22]]))
        call = "present" if present[n] else "absent"
        verdict = "ok" if bool(present[n]) == bool(truth[n]) else "WRONG"
        panels.append(_caption(heatmap(fg[n], size), [f"max P {float(scores[n]):.2f}", f"{call} {verdict}"]))
    return panels


def fscs_columns(way: int, shot: int) -> str:
    """The grid's column captions, left to right."""
    cols = ["query", "ground truth", "prediction"]
    for n in range(way):
        cols += [f"way {n + 1} support {k + 1}" for k in range(shot)] + [f"way {n + 1} P_fg map"]
    return " | ".join(cols)


# --------------------------------------------------------------------------------------------------
# evaluation


def fscs_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A sequential loader over FS-CS episodes with :func:`fscs_collate`."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=fscs_collate)


def score_batch(model: Callable, batch: dict[str, Any], protocol: str, meter: FscsMeter
                ) -> tuple[FscsPrediction, list[dict[str, Any]]]:
    """Predict one collated batch (on the model's device) and add every episode to ``meter``.

    Scored like the FS-S core (:func:`fewshot.evaluate.prediction_at_label`): the merged probabilities are
    upsampled to the original label (pfenet) or scored at the input size (hsnet); presence is decided once,
    at the model's output over the image's pixels, and absent ways are dropped after upsampling.
    """
    valid = content_mask(batch["content"], batch["query"].shape[-1])
    out = predict(model, batch["query"], batch["supports"], batch["support_masks"], valid)
    records = []
    for i in range(batch["size"]):
        pred, target = prediction_at_label(out.merged[i], batch["query_label_orig"][i], batch["query_label"][i],
                                           protocol)
        pred = drop_absent(pred, out.present[i])
        records.append(meter.update(pred, target, batch["class_ids"][i].tolist(), out.present[i],
                                    batch["presence"][i]))
    return out, records


def score_shard(model: nn.Module, dataset: FscsDataset, indices: list[int], spec: FscsSpec,
                accelerator: Accelerator, vis_episodes: int = 0, desc: str = "evaluate FS-CS"
                ) -> tuple[FscsMeter, list[str], list[tuple[int, list[Tensor], str]]]:
    """Score the episodes ``indices`` of ``dataset`` (one process's shard); returns the meter, the skipped
    episodes and the PNG rows of episodes below ``vis_episodes`` as (index, panels, title)."""
    bench = dataset.benchmark
    meter = FscsMeter(bench.class_ids)
    loader = fscs_loader(Subset(dataset, indices), spec.batch_size, spec.num_workers)
    skipped, rows = [], []
    for batch in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not accelerator.is_local_main_process,
                      leave=False):
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            out, records = score_batch(model, batch, spec.protocol, meter)
        for i, record in enumerate(records):
            index = int(batch["episode_index"][i])
            if index >= vis_episodes:
                continue
            classes = batch["class_ids"][i].tolist()
            names = [str(bench.class_names.get(c, c)) for c in classes]
            rows.append((index, fscs_row(batch["supports"][i], batch["support_masks"][i], batch["query"][i],
                                         batch["query_label"][i], out.label[i], out.probs[i, :, 1],
                                         out.scores[i], out.present[i], batch["presence"][i], names),
                         f"episode {index}  " + "  ".join(
                             f"{nm}: {'present' if t else 'absent'}" for nm, t in zip(names, batch["presence"][i]))
                         + f"  | all calls right: {'yes' if record['exact'] else 'no'}"))
    return meter, skipped, rows


@torch.no_grad()
def evaluate_fscs(model: nn.Module, benchmark: FewShotBenchmark, spec: FscsSpec, seed: int,
                  accelerator: Accelerator, out_dir: Path | None = None, vis_episodes: int = 0,
                  episode_meta: dict[str, Any] | None = None, episodes: list[FscsEpisode] | None = None,
                  desc: str = "evaluate FS-CS") -> dict[str, Any]:
    """Score ``model`` on the FS-CS episodes of ``(benchmark, spec, seed)`` (or the given ``episodes``).

    Every process must call it: episodes are sharded ``rank::world`` and the meters summed, so the numbers do
    not depend on the number of processes. Writes the episode list (and the first ``vis_episodes`` as a PNG
    grid per process) to ``out_dir`` when given.

    Returns:
        ``{"meter": {er, miou, fbiou, way_accuracy, positive_rate, per_class_iou, per_class_name, episodes},
        "episodes_hash", "episodes", "skipped", "grid", "grid_columns"}``.
    """
    if episodes is None:
        episodes = make_fscs_episodes(benchmark, spec.way, spec.shot, spec.episodes, seed, spec.query_order,
                                      spec.rule)
    way = len(episodes[0].class_ids) if episodes else spec.way
    digest = fscs_episodes_hash(episodes)
    if out_dir is not None and accelerator.is_main_process:
        save_fscs_episodes(episodes, out_dir / f"fscs_episodes_{way}way{spec.shot}shot_seed{seed}.json",
                           {"benchmark": benchmark.name, "split": benchmark.split, **(episode_meta or {}),
                            "way": way, "shot": spec.shot, "seed": seed, "count": spec.episodes,
                            "query_order": spec.query_order, "rule": spec.rule})
    dataset = FscsDataset(benchmark, episodes, EvalTransform(spec.size, spec.protocol), way, spec.shot, seed, 0,
                          spec.on_bad_sample)
    world, rank = accelerator.num_processes, accelerator.process_index
    was_training = model.training
    model.eval()
    meter, skipped, rows = score_shard(model, dataset, list(range(rank, len(dataset), world)), spec, accelerator,
                                       vis_episodes if out_dir is not None else 0, desc)
    if was_training:
        model.train()
    result = merged_result(meter, skipped, benchmark, spec, len(episodes), digest, accelerator,
                           f"FS-CS seed {seed}")
    if rows and out_dir is not None:
        rows.sort(key=lambda r: r[0])
        path = out_dir / f"fscs_grid_{way}way{spec.shot}shot_seed{seed}_rank{rank}.png"
        save_grid([r[1] for r in rows], [r[2] for r in rows], path)
        result["grid"] = str(path)
        result["grid_columns"] = fscs_columns(way, spec.shot)
    return result


def evaluate_fscs_seeds(model: nn.Module, benchmark: FewShotBenchmark, spec: FscsSpec, seeds: list[int],
                        accelerator: Accelerator, out_dir: Path, meta: dict[str, Any], vis_episodes: int = 0,
                        episodes: list[FscsEpisode] | None = None) -> dict[str, Any]:
    """:func:`evaluate_fscs` once per seed; writes ``results.json`` and ``results.md`` to ``out_dir``.

    ``meta`` (method, benchmark, fold, checkpoint, ...) is recorded at the top of the results; the keys
    ``miou_mean`` / ``fbiou_mean`` / ``shot`` / ``seeds`` keep :mod:`fewshot.report` able to read the file.
    """
    per_seed = []
    for j, seed in enumerate(seeds):
        r = evaluate_fscs(model, benchmark, spec, seed, accelerator, out_dir, vis_episodes if j == 0 else 0,
                          {"fold": meta.get("fold", "")}, episodes, desc=f"evaluate FS-CS seed {seed}")
        per_seed.append({"seed": seed, **r})

    def stat(name: str) -> tuple[float, float]:
        values = [r["meter"][name] for r in per_seed]
        return statistics.mean(values), statistics.pstdev(values)

    results: dict[str, Any] = {
        **meta, "task": "fscs", "way": len(episodes[0].class_ids) if episodes else spec.way, "shot": spec.shot,
        "protocol": spec.protocol, "rule": spec.rule, "split": benchmark.split,
        "episodes": len(episodes) if episodes is not None else spec.episodes, "seeds": list(seeds),
        "eval_size": spec.size, "processes": accelerator.num_processes, "per_seed": per_seed}
    for name in ("er", "miou", "fbiou", "way_accuracy", "positive_rate"):
        results[f"{name}_mean"], results[f"{name}_std"] = stat(name)
    if accelerator.is_main_process:
        write_json(out_dir / "results.json", results)
        write_text(out_dir / "results.md", fscs_markdown(results))
    return results


def check_fscs_episodes(benchmark: FewShotBenchmark, spec: FscsSpec, seeds: list[int],
                        episodes: list[FscsEpisode] | None = None) -> list[str]:
    """Read every query and support the FS-CS evaluation of ``seeds`` will use, before any work is spent.

    Returns the bad ones with ``spec.on_bad_sample == "skip"`` (an error beyond ``spec.max_skipped``); with
    ``error`` the first bad file raises its :class:`DataError` naming it.
    """
    lists = [episodes] if episodes is not None else [
        make_fscs_episodes(benchmark, spec.way, spec.shot, spec.episodes, seed, spec.query_order, spec.rule)
        for seed in seeds]
    reader = FscsDataset(benchmark, [], EvalTransform(spec.size, spec.protocol))
    queries = sorted({(e.query, e.class_ids) for ep in lists for e in ep})
    supports = sorted({(k, c) for ep in lists for e in ep for c, keys in zip(e.class_ids, e.supports) for k in keys})
    bad = []
    for role, key, classes in [("query", q, c) for q, c in queries] + [("support", k, (c,)) for k, c in supports]:
        try:
            if role == "query":
                reader.read_query(key, classes)
            else:
                reader.reader.read(key, classes[0], "support")
        except DataError as err:
            if spec.on_bad_sample == "error":
                raise
            bad.append(str(err))
    check_skipped(bad, len(queries) + len(supports), spec.max_skipped if spec.on_bad_sample == "skip" else 0.0,
                  f"{benchmark!r}: images of the FS-CS evaluation episodes")
    return bad


# --------------------------------------------------------------------------------------------------
# results as people read them


def _pm(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n > 1 else "")


def fscs_markdown(results: dict[str, Any]) -> str:
    """One FS-CS evaluation (several seeds) as markdown: headline numbers, then per-class IoU per seed."""
    method = f"`{results['method']}` on " if results.get("method") else ""
    n = len(results["seeds"])
    head = (f"# {method}{results['benchmark']} fold {results['fold']}, FS-CS {results['way']}-way "
            f"{results['shot']}-shot, {results['protocol']} protocol\n\n{results['episodes']} episodes x {n} seeds "
            f"({results['seeds']}), support classes by rule `{results['rule']}`, checkpoint "
            f"`{results.get('checkpoint', '')}`\n\n")
    summary = markdown_table(["ER (%)", "mIoU (%)", "FB-IoU (%)", "way accuracy (%)", "ways present (%)"], [[
        _pm(results["er_mean"], results["er_std"], n), _pm(results["miou_mean"], results["miou_std"], n),
        _pm(results["fbiou_mean"], results["fbiou_std"], n),
        _pm(results["way_accuracy_mean"], results["way_accuracy_std"], n),
        f"{100 * results['positive_rate_mean']:.1f}"]])
    names = sorted({k for r in results["per_seed"] for k in r["meter"]["per_class_name"]})
    per_class = markdown_table(["seed", *names], [
        [r["seed"], *[100 * r["meter"]["per_class_name"].get(k, float("nan")) for k in names]]
        for r in results["per_seed"]])
    text = (head + summary + "\nER: share of episodes whose every presence call (max P_fg >= 0.5) is right; "
            "mIoU over the classes, each class accumulated over the episodes it was a way in.\n\n"
            "Per-class IoU (%):\n\n" + per_class)
    skipped = sum(len(r.get("skipped", [])) for r in results["per_seed"])
    if skipped:
        text += f"\n{skipped} episodes were skipped as bad input (listed in results.json) and are not scored.\n"
    return text


def fscs_table(results: list[dict[str, Any]], by: str = "benchmark") -> str:
    """Rows per (method, way, shot), one column per benchmark (or fold), then their mean; cells ER / mIoU %."""
    keys = sorted({str(r[by]) for r in results})
    lines = []
    methods = list(dict.fromkeys(r.get("method", "?") for r in results))
    for method in methods:
        for way, shot in sorted({(r["way"], r["shot"]) for r in results if r.get("method", "?") == method}):
            rows = {str(r[by]): r for r in results
                    if r.get("method", "?") == method and (r["way"], r["shot"]) == (way, shot)}
            cells, ers, mious = [], [], []
            for key in keys:
                r = rows.get(key)
                if r is None:
                    cells.append("-")
                    continue
                cells.append(f"{100 * r['er_mean']:.1f} / {100 * r['miou_mean']:.1f}")
                ers.append(r["er_mean"])
                mious.append(r["miou_mean"])
            mean = f"{100 * statistics.mean(ers):.1f} / {100 * statistics.mean(mious):.1f}" if ers else "-"
            lines.append([method, f"{way}-way {shot}-shot", *cells, mean])
    header = ["method", "setting", *[f"{by} {k}" for k in keys], "mean"]
    return markdown_table(header, lines) + "\ncells: FS-CS ER / mIoU (%), mean over evaluation seeds\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fewshot.fscs",
                                     description="Table FS-CS results.json files (ER / mIoU).")
    parser.add_argument("results", nargs="+", help="FS-CS results.json files")
    parser.add_argument("--by", choices=["benchmark", "fold"], default="benchmark", help="table columns")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    loaded = []
    for path in args.results:
        data = json.loads(Path(path).read_text())
        if data.get("task") != "fscs":
            raise SystemExit(f"{path}: not an FS-CS results file (no task: fscs)")
        loaded.append(data)
    table = fscs_table(loaded, args.by)
    print(table)
    if args.out:
        write_text(args.out, table)


if __name__ == "__main__":
    main()
