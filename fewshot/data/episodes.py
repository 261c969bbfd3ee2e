"""Episode lists drawn from a benchmark's index by a seed alone, saved as JSON with a content hash.

An episode list depends only on (benchmark index, shot, n, seed, query order): never on workers, processes
or batch size, so it can be precomputed, cached beside a run and hashed into its results. Query orders:

* ``random``: class uniform over the split's classes, query uniform within the class (HSNet);
* ``cycle``: walk the benchmark's image list in order (wrapping around), class uniform among the classes the
  query may be asked about (PFENet evaluation; with ``n_episodes=0`` every image is a query once, e.g. the
  2,400 FSS-1000 test episodes);
* ``shuffle``: the same over a seeded permutation of the images (PFENet training: every image once per epoch).

In every order the k supports are drawn uniformly without replacement from the class's samples, never the
query. Classes (or queries) without enough supports are left out with a warning that says how many.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path
from typing import Literal

from common.io import write_json
from fewshot.data.base import EpisodeSpec, FewShotBenchmark

QueryOrder = Literal["random", "cycle", "shuffle"]
FORMAT = "qgnet-episodes/1"


def make_episodes(benchmark: FewShotBenchmark, shot: int, n_episodes: int, seed: int,
                  query_order: QueryOrder = "random") -> list[EpisodeSpec]:
    """``n_episodes`` episodes of ``shot`` supports (``n_episodes=0`` with cycle / shuffle: one per image)."""
    if shot < 1:
        raise ValueError(f"shot must be >= 1, got {shot}")
    draw = getattr(benchmark, "draw_episodes", None)  # a benchmark of several sources draws per source
    if draw is not None:
        return draw(shot, n_episodes, seed, query_order)
    rng = random.Random(seed)
    keys_of = {c: [s.key for s in benchmark.samples_by_class.get(c, [])] for c in benchmark.class_ids}
    if query_order == "random":
        if n_episodes < 1:
            raise ValueError("query_order='random' needs n_episodes >= 1")
        classes = [c for c in benchmark.class_ids if len(keys_of[c]) > shot]
        report_unusable(benchmark, [c for c in benchmark.class_ids if c not in classes], shot)
        if not classes:
            raise ValueError(f"{benchmark!r}: no class has {shot + 1} images, cannot draw {shot}-shot episodes")
        episodes = []
        for _ in range(n_episodes):
            c = rng.choice(classes)
            query = rng.choice(keys_of[c])
            episodes.append(EpisodeSpec(query, tuple(rng.sample([k for k in keys_of[c] if k != query], shot)), c))
        return episodes
    if query_order not in ("cycle", "shuffle"):
        raise ValueError(f"query_order must be random, cycle or shuffle, got {query_order!r}")
    keys = benchmark.image_keys()
    members = {c: set(k) for c, k in keys_of.items()}
    if query_order == "shuffle":
        rng.shuffle(keys)
    target = n_episodes or len(keys)
    episodes, skipped, i = [], 0, 0
    while len(episodes) < target:
        if i == len(keys) and not episodes:
            raise ValueError(f"{benchmark!r}: no image has a class with {shot} other images; no episode possible")
        key = keys[i % len(keys)]
        i += 1
        choices = [c for c in benchmark.query_classes(key)
                   if len(keys_of.get(c, ())) - (key in members[c]) >= shot]
        if not choices:
            skipped += i <= len(keys)  # count each image once, not on every wrap-around
            continue
        c = rng.choice(choices)
        episodes.append(EpisodeSpec(key, tuple(rng.sample([k for k in keys_of[c] if k != key], shot)), c))
    if skipped:
        warnings.warn(f"{benchmark!r}: {skipped} of {len(keys)} query images have no class with {shot} other "
                      f"images and were passed over", stacklevel=2)
    return episodes


def epoch_episodes(benchmark: FewShotBenchmark, shot: int, seed: int, epoch: int, n_episodes: int = 0,
                   query_order: QueryOrder = "shuffle") -> list[EpisodeSpec]:
    """The training list of one epoch: a fresh draw from ``seed + epoch`` (PFENet reseeds the same way)."""
    return make_episodes(benchmark, shot, n_episodes, seed + epoch, query_order)


def report_unusable(benchmark: FewShotBenchmark, classes: list[int], shot: int) -> None:
    if classes:
        names = ", ".join(f"{c} ({benchmark.class_names.get(c, c)}: {len(benchmark.samples_by_class.get(c, []))})"
                          for c in classes)
        warnings.warn(f"{benchmark!r}: classes with fewer than {shot + 1} images get no {shot}-shot episodes: "
                      f"{names}", stacklevel=3)


def episodes_hash(episodes: list[EpisodeSpec]) -> str:
    """16 hex digits of the SHA-256 of the list's canonical JSON: equal lists, equal hashes."""
    payload = json.dumps([[e.query, list(e.supports), e.class_id] for e in episodes], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_episodes(episodes: list[EpisodeSpec], path: str | Path, meta: dict | None = None) -> str:
    """Write the list as JSON (with ``meta`` such as benchmark, fold, shot, seed) and return its hash."""
    digest = episodes_hash(episodes)
    body = {"format": FORMAT, "hash": digest, "count": len(episodes), "meta": meta or {},
            "episodes": [[e.query, list(e.supports), e.class_id] for e in episodes]}
    write_json(path, body, indent=None)
    return digest


def load_episodes(path: str | Path) -> list[EpisodeSpec]:
    """Read a list written by :func:`save_episodes`; a wrong format or a hash mismatch raises ValueError."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
        episodes = [EpisodeSpec(str(q), tuple(str(s) for s in sup), int(c)) for q, sup, c in body["episodes"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a readable episode list ({err})") from err
    if body.get("format") != FORMAT:
        raise ValueError(f"{path}: format {body.get('format')!r}, expected {FORMAT!r}")
    if episodes_hash(episodes) != body.get("hash"):
        raise ValueError(f"{path}: content hash {episodes_hash(episodes)} does not match the stored "
                         f"{body.get('hash')} (the file was edited or truncated)")
    return episodes
