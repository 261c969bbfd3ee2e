"""Class splits that never leak, over one dataset or several at once (``data.sources``).

A run's classes fall in three disjoint sets: training classes (every training episode), validation classes
(model selection: classes no training episode uses) and test classes (the numbers reported). This module
builds the three splits from the ``data.*`` config and checks, before any work, that no class (compared by
normalised name, so COCO's "dining table" and a semantic set's "dining_table" are one class) is in two of
them across all sources.

* **Validation classes** (``data.val_classes`` by name, or ``data.val_class_fraction``): taken out of the
  training classes of every source: the share is of the union of training class names, those ranked first by
  ``sha1(f"{val_seed}:{name}")``, so a class held out for validation is held out everywhere. Without either,
  split ``val`` is each benchmark's own (PASCAL / COCO: held-out images of the training classes).
* **Several sources** (``data.sources``: a list of ``data.*`` overrides, each with a ``name`` and an optional
  ``weight``, ``train: false`` (a test-only source) and ``test: false`` (a training-only source)): every source
  is a benchmark of its own; :class:`MultiSource` joins them with keys ``<source>::<key>`` and class ids
  ``1000 * (i + 1) + id``. An episode always stays within one source (its class belongs to one source); training
  episodes are drawn per source by ``weight`` (0 = in proportion
  to the source's (image, class) pairs).
* **Seen-class evaluation**: when a source's ``data.fold`` is ``all``, its test classes are its training
  classes on purpose (cross-domain source training); the overlap check skips that source's test classes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from common.config import ConfigError, build, deep_merge, to_dict
from common.errors import DataError
from fewshot.data.base import EpisodeSpec, FewShotBenchmark, Sample
from fewshot.data.config import DataConfig
from fewshot.data.episodes import QueryOrder, make_episodes
from fewshot.data.registry import build_benchmark

SPLITS = ("train", "val", "test")
SOURCE_KEYS = ("name", "weight", "train", "test")  # per-source keys that are not data.* keys
KEY_SEP = "::"
ID_STRIDE = 1000


def normalise_name(name: str) -> str:
    """Class names compared across datasets: lower case, runs of spaces / '_' / '-' as one '_'."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def rank_by_hash(names: list[str], seed: int) -> list[str]:
    """``names`` ordered by ``sha1(f"{seed}:{name}")``: a seeded, order-independent choice of held-out classes."""
    return sorted(names, key=lambda n: hashlib.sha1(f"{seed}:{n}".encode()).digest())


@dataclass
class Source:
    """One dataset of a run: its resolved ``data.*`` config, sampling weight, and whether it is trained / tested on."""

    name: str
    cfg: DataConfig
    weight: float = 0.0
    test: bool = True
    train: bool = True


def source_configs(cfg: DataConfig) -> list[Source]:
    """The run's sources: ``data.sources`` entries merged over the top-level ``data.*`` keys, or the one dataset.

    Raises:
        ConfigError: an entry with a bad key or value, named ``data.sources[i]``.
    """
    if not cfg.sources:
        return [Source(cfg.benchmark, cfg)]
    base = {k: v for k, v in to_dict(cfg).items() if k != "sources"}
    out = []
    for i, entry in enumerate(cfg.sources):
        own = {k: v for k, v in entry.items() if k not in SOURCE_KEYS}
        sub = build(DataConfig, deep_merge(base, own), source=f"data.sources[{i}] ({entry.get('name')})")
        out.append(Source(str(entry["name"]), sub, float(entry.get("weight", 0.0)), bool(entry.get("test", True)),
                          bool(entry.get("train", True))))
    if cfg.sources and not any(s.train for s in out):
        raise ConfigError("data.sources: every source has train: false; at least one must give training episodes")
    if cfg.sources and not any(s.test for s in out):
        raise ConfigError("data.sources: every source has test: false; at least one must give test episodes")
    return out


class ClassSubset(FewShotBenchmark):
    """A benchmark split restricted to some of its classes (the others are background, as for any split)."""

    def __init__(self, base: FewShotBenchmark, class_ids: list[int], split: str) -> None:
        keep = set(class_ids)
        self.base, self.name, self.split = base, base.name, split
        self.class_ids = [c for c in base.class_ids if c in keep]
        self.class_names = base.class_names
        self.samples_by_class = {c: base.samples_by_class.get(c, []) for c in self.class_ids}

    def load(self, sample: Sample, class_id: int) -> tuple[Any, Any]:
        return self.base.load(sample, class_id)

    def image_keys(self) -> list[str]:
        mine = set(super().image_keys())
        return [k for k in self.base.image_keys() if k in mine]

    def query_classes(self, key: str) -> list[int]:
        keep = set(self.class_ids)
        return [c for c in self.base.query_classes(key) if c in keep]


class MultiSource(FewShotBenchmark):
    """Several benchmarks' splits as one, each episode within one source.

    Args:
        parts: ``(source name, weight, benchmark)``; weight 0 = in proportion to the source's pairs.
        split: the split the parts are.
    """

    name = "multi"

    def __init__(self, parts: list[tuple[str, float, FewShotBenchmark]], split: str) -> None:
        if not parts:
            raise DataError(f"no source has a {split!r} split")
        self.parts, self.split = parts, split
        self.class_ids, self.class_names, self.samples_by_class = [], {}, {}
        self._origin: dict[int, tuple[int, int]] = {}
        for i, (name, _, bench) in enumerate(parts):
            for c in bench.class_ids:
                g = ID_STRIDE * (i + 1) + c
                self.class_ids.append(g)
                self.class_names[g] = f"{name}:{bench.class_names.get(c, c)}"
                self.samples_by_class[g] = [Sample(f"{name}{KEY_SEP}{s.key}", s.image_path, s.mask_path)
                                            for s in bench.samples_by_class.get(c, [])]
                self._origin[g] = (i, c)

    def _split_key(self, key: str) -> tuple[int, str]:
        name, _, inner = key.partition(KEY_SEP)
        return next(i for i, (n, _, _) in enumerate(self.parts) if n == name), inner

    def load(self, sample: Sample, class_id: int) -> tuple[Any, Any]:
        i, inner = self._split_key(sample.key)
        bench = self.parts[i][2]
        return bench.load(bench.sample(inner), self._origin[class_id][1])

    def image_keys(self) -> list[str]:
        return [f"{n}{KEY_SEP}{k}" for n, _, b in self.parts for k in b.image_keys()]

    def query_classes(self, key: str) -> list[int]:
        i, inner = self._split_key(key)
        return [ID_STRIDE * (i + 1) + c for c in self.parts[i][2].query_classes(inner)]

    def draw_episodes(self, shot: int, n_episodes: int, seed: int, query_order: QueryOrder) -> list[EpisodeSpec]:
        """Episodes per source (``n_episodes`` split by weight, largest remainder; 0 with cycle / shuffle = one per
        image of every source), each drawn by :func:`make_episodes` from a seed of (seed, source), then shuffled
        together with ``seed``: a pure function of the arguments."""
        weights = [w if w > 0 else float(b.num_pairs()) for _, w, b in self.parts]
        if n_episodes:
            exact = [n_episodes * w / sum(weights) for w in weights]
            counts = [int(x) for x in exact]
            for j in sorted(range(len(exact)), key=lambda j: counts[j] - exact[j])[:n_episodes - sum(counts)]:
                counts[j] += 1
        else:
            counts = [0] * len(self.parts)
        episodes = []
        for i, ((name, _, bench), count) in enumerate(zip(self.parts, counts)):
            if n_episodes and not count:
                continue
            own_seed = int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:4], "big")
            for e in make_episodes(bench, shot, count, own_seed, query_order):
                episodes.append(EpisodeSpec(f"{name}{KEY_SEP}{e.query}",
                                            tuple(f"{name}{KEY_SEP}{k}" for k in e.supports),
                                            ID_STRIDE * (i + 1) + e.class_id))
        random.Random(seed).shuffle(episodes)
        return episodes


@dataclass
class Splits:
    """The run's benchmarks: ``train`` / ``val`` joined over sources, ``test`` per source (reported apart)."""

    train: FewShotBenchmark
    val: FewShotBenchmark | None
    test: dict[str, FewShotBenchmark] = field(default_factory=dict)


def _names(bench: FewShotBenchmark) -> dict[str, int]:
    return {normalise_name(bench.class_names.get(c, c)): c for c in bench.class_ids}


def _held_out_names(train_names: list[str], cfg: DataConfig) -> set[str]:
    """The validation class names: the explicit list, or the hashed share of every source's training names."""
    if cfg.val_classes:
        names = {normalise_name(n) for n in cfg.val_classes}
        unknown = sorted(names - set(train_names))
        if unknown:
            raise DataError(f"data.val_classes: {unknown[0]!r} is not a training class of any source")
        return names
    if cfg.val_class_fraction <= 0:
        return set()
    n_val = max(1, round(cfg.val_class_fraction * len(train_names)))
    if n_val >= len(train_names):
        raise DataError(f"data.val_class_fraction={cfg.val_class_fraction} of {len(train_names)} training classes "
                        "leaves none for training")
    return set(rank_by_hash(sorted(train_names), cfg.val_seed)[:n_val])


def check_disjoint(splits: dict[str, dict[str, FewShotBenchmark | None]], seen_test: set[str]) -> None:
    """Raise DataError naming the class and the sources when a class name is in two of train / val / test.

    ``seen_test``: sources whose test classes are their training classes on purpose (``data.fold=all``).
    """
    where: dict[str, dict[str, set[str]]] = {s: {} for s in SPLITS}
    for source, parts in splits.items():
        for split, bench in parts.items():
            if bench is None or (split == "test" and source in seen_test):
                continue
            for name in _names(bench):
                where[split].setdefault(name, set()).add(source)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(set(where[a]) & set(where[b]))
        if both:
            c = both[0]
            raise DataError(f"class {c!r} is a {a} class (in {', '.join(sorted(where[a][c]))}) and a {b} class "
                            f"(in {', '.join(sorted(where[b][c]))}); a class must be in one split only "
                            f"({len(both)} such classes: {', '.join(both[:8])})")


def build_splits(cfg: DataConfig, need_train: bool = True, need_val: bool = True) -> Splits:
    """Index every source's splits, carve the validation classes, check class-disjointness; nothing trains yet.

    ``need_train=False`` builds the test splits only (a training-free method); ``need_val=False`` skips the
    benchmarks' own validation splits (validation classes, when configured, are always carved).
    """
    sources = source_configs(cfg)
    built: dict[str, dict[str, FewShotBenchmark | None]] = {}
    for src in sources:
        built[src.name] = {"train": build_benchmark(src.cfg, "train") if need_train and src.train else None,
                           "val": None, "test": build_benchmark(src.cfg, "test") if src.test else None}
    held = set()
    if need_train:
        held = _held_out_names(sorted({n for p in built.values() if p["train"] is not None
                                       for n in _names(p["train"])}), cfg)
    for src in sources:
        parts = built[src.name]
        if parts["train"] is None:  # a test-only source (train: false), or no training at all
            continue
        if held:
            names = _names(parts["train"])
            val_ids = [c for n, c in names.items() if n in held]
            parts["val"] = ClassSubset(parts["train"], val_ids, "val") if val_ids else None
            parts["train"] = ClassSubset(parts["train"], [c for n, c in names.items() if n not in held], "train")
        elif need_train and need_val:
            own = build_benchmark(src.cfg, "val")  # held-out images of the training classes (PASCAL, COCO)
            parts["val"] = own if own.class_ids else None
    check_disjoint(built, {s.name for s in sources if s.cfg.fold in ("all", -1)})
    weights = {s.name: s.weight for s in sources}

    def join(split: str) -> FewShotBenchmark | None:
        parts = [(name, weights[name], p[split]) for name, p in built.items() if p[split] is not None]
        if not parts:
            return None
        return parts[0][2] if not cfg.sources else MultiSource(parts, split)

    return Splits(train=join("train"), val=join("val"),
                  test={name: p["test"] for name, p in built.items() if p["test"] is not None})
