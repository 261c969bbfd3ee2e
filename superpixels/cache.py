"""On-disk cache of superpixel label maps, computed once per dataset so the training loop never segments.

Layout: ``<cache_dir>/<params_hash>/<key[:2]>/<key>.npz`` holding one uint16 array ``labels`` [H,W], where
``key = sha1(params_hash + image file bytes)``: renaming or moving images keeps their entries, editing an
image or changing a label-map parameter gives new ones. Images found bad by :func:`precompute` are listed in
``<cache_dir>/<params_hash>/bad_images.tsv`` (path, reason).

Command line::

    python -m superpixels.cache IMAGES --cache-dir DIR [--config FILE] [--n-segments 32 ...] [--workers 4]
        [--on-bad-image skip]

IMAGES is a folder (searched recursively) or a text file with one image path per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

import numpy as np
from tqdm import tqdm

from common.config import ConfigError, build, load_yaml_tree
from common.errors import DataError
from common.images import list_images, read_rgb
from common.io import atomic_path, write_text
from superpixels.segment import SuperpixelConfig, compute_superpixels, segment_ids_for_sampling

BAD_LIST_NAME = "bad_images.tsv"


class MissingSuperpixelsError(FileNotFoundError):
    """A label map that should have been precomputed is not in the cache."""


class BadImageError(DataError, ValueError):
    """An image that cannot be decoded or segmented into at least two usable superpixels."""


class SuperpixelCache:
    """Read/write access to the cached label maps of one parameter set.

    Args:
        cache_dir: cache root; entries live under ``cache_dir/<cfg.params_hash()>``.
        cfg: the label-map parameters.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], cfg: SuperpixelConfig) -> None:
        if not str(cache_dir):
            raise ValueError("superpixels.cache_dir is empty: set it to the folder that holds the label-map cache")
        self.cfg = cfg
        self.params_hash = cfg.params_hash()
        self.root = Path(cache_dir) / self.params_hash

    def key_for(self, image_bytes: bytes) -> str:
        """Cache key (40 hex digits) of an image file's raw bytes under this parameter set."""
        return hashlib.sha1(self.params_hash.encode() + image_bytes).hexdigest()

    def path_for(self, key: str) -> Path:
        """Where the entry for ``key`` lives (whether or not it exists)."""
        return self.root / key[:2] / f"{key}.npz"

    def has(self, key: str) -> bool:
        """True when ``key`` has a cached label map."""
        return self.path_for(key).is_file()

    def load(self, key: str) -> np.ndarray:
        """The cached [H,W] uint16 label map of ``key``; raises with the command that fills the cache."""
        path = self.path_for(key)
        if not path.is_file():
            raise MissingSuperpixelsError(
                f"no cached superpixels at {path}; precompute them first with:\n  "
                f"{precompute_command(self.cfg, self.root.parent)}")
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: corrupt superpixel cache entry ({err}); delete it and re-run "
                             f"`python -m superpixels.cache`") from err

    def labels_for(self, image_bytes: bytes) -> np.ndarray:
        """Shortcut for ``load(key_for(image_bytes))``: the [H,W] label map of an image file's bytes."""
        return self.load(self.key_for(image_bytes))

    def save(self, key: str, labels: np.ndarray) -> Path:
        """Store a [H,W] label map (ids < 65536) atomically: readers never see a half-written file."""
        if labels.ndim != 2:
            raise ValueError(f"label map must be [H,W], got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"label ids must fit uint16, got range [{labels.min()}, {labels.max()}]")
        path = self.path_for(key)
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez_compressed(fh, labels=labels.astype(np.uint16))
        return path

    def bad_images(self) -> dict[str, str]:
        """Images that :func:`precompute` found unusable under these parameters: path -> reason."""
        path = self.root / BAD_LIST_NAME
        if not path.is_file():
            return {}
        rows = (line.split("\t", 1) for line in path.read_text().splitlines() if line)
        return {p: reason for p, reason in rows}


@dataclass
class PrecomputeReport:
    """Outcome of :func:`precompute`; ``bad`` maps each unusable image path to the reason."""

    total: int
    computed: int
    cached: int
    bad: dict[str, str]

    def summary(self) -> str:
        """One line of counts."""
        return (f"{self.total} images: {self.computed} computed, {self.cached} already cached, "
                f"{len(self.bad)} bad (skipped)")


def _process(job: tuple[str, SuperpixelConfig, str]) -> tuple[str, str, str]:
    """Worker: (path, cfg, cache_dir) -> (path, "computed" | "cached" | "bad", reason)."""
    path, cfg, cache_dir = job
    cache = SuperpixelCache(cache_dir, cfg)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return path, "bad", f"cannot read file ({err})"
    key = cache.key_for(data)
    if cache.has(key):
        return path, "cached", ""
    try:
        labels = compute_superpixels(read_rgb(data, path), cfg)
        segment_ids_for_sampling(labels, cfg.min_area_frac)
    except (DataError, ValueError) as err:  # undecodable, TooFewSegmentsError, or too small to segment
        return path, "bad", str(err).removeprefix(f"{path}: ")
    cache.save(key, labels)
    return path, "computed", ""


def precompute(image_paths: list[str], cfg: SuperpixelConfig, cache_dir: str | os.PathLike[str], workers: int,
               on_bad_image: Literal["error", "skip"] = "error", progress: bool = True) -> PrecomputeReport:
    """Compute and cache the label map of every image not cached yet, in ``workers`` processes.

    Args:
        image_paths: image files.
        cfg: label-map parameters (its ``min_area_frac`` also decides which images are bad).
        cache_dir: cache root.
        workers: processes; 0 or 1 runs in this process.
        on_bad_image: "error" raises BadImageError naming the first bad file; "skip" lists it in the report
            and in ``bad_images.tsv``.
        progress: show a tqdm bar.

    Returns:
        Counts of computed, already cached and bad images.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    cfg.validate()
    cache = SuperpixelCache(cache_dir, cfg)
    cache.root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), cfg, str(cache_dir)) for p in image_paths]
    counts = {"computed": 0, "cached": 0}
    bad: dict[str, str] = {}
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_process, jobs, chunksize=4) if pool else map(_process, jobs)
        for path, status, reason in tqdm(results, total=len(jobs), disable=not progress, desc="superpixels"):
            if status != "bad":
                counts[status] += 1
            elif on_bad_image == "error":
                raise BadImageError(f"{path}: {reason} (pass --on-bad-image skip to list and skip bad images)")
            else:
                bad[path] = reason
    finally:
        if pool:
            pool.terminate()
            pool.join()
    _update_bad_list(cache, {p for p, _, _ in jobs}, bad)
    return PrecomputeReport(total=len(jobs), computed=counts["computed"], cached=counts["cached"], bad=bad)


def _update_bad_list(cache: SuperpixelCache, examined: set[str], bad: dict[str, str]) -> None:
    """Replace the entries of the examined paths in ``bad_images.tsv``, keeping the others."""
    merged = {p: r for p, r in cache.bad_images().items() if p not in examined}
    merged.update({p: r.replace("\t", " ").replace("\n", " ") for p, r in bad.items()})
    path = cache.root / BAD_LIST_NAME
    if not merged:
        path.unlink(missing_ok=True)
        return
    write_text(path, "".join(f"{p}\t{r}\n" for p, r in sorted(merged.items())))


def precompute_command(cfg: SuperpixelConfig, cache_dir: str | os.PathLike[str]) -> str:
    """The shell command that fills the cache for ``cfg`` (quoted in error messages)."""
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.label_params().items())
    return f"python -m superpixels.cache <image-folder-or-list> --cache-dir {cache_dir} {flags}"


def _config_section(path: str, section: str) -> dict[str, Any]:
    """The superpixel section of a (possibly inheriting) YAML config, e.g. the pretraining config."""
    node: Any = load_yaml_tree(path)
    for part in section.split(".") if section else []:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{path}: no section '{section}' (pass --config-section)")
        node = node[part]
    return node or {}


def main(argv: list[str] | None = None) -> int:
    """``python -m superpixels.cache``: precompute a folder or list of images, then print the counts."""
    parser = argparse.ArgumentParser(prog="python -m superpixels.cache",
                                     description="Precompute and cache superpixel label maps.")
    parser.add_argument("images", help="image folder (recursive) or a text file with one image path per line")
    parser.add_argument("--root", help="folder that relative paths of a list file are relative to")
    parser.add_argument("--config", help="YAML config to read the superpixel parameters from (flags override)")
    parser.add_argument("--config-section", default="superpixels",
                        help="dotted key of the superpixel section inside --config (default: superpixels)")
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                        help="'error' stops at the first bad image; 'skip' lists bad images and goes on")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    hints = get_type_hints(SuperpixelConfig)
    for f in dataclasses.fields(SuperpixelConfig):
        kind = hints[f.name]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=f.metadata["help"],
                            type=kind if kind in (int, float) else str)
    args = parser.parse_args(argv)
    tree = _config_section(args.config, args.config_section) if args.config else {}
    tree.update({f.name: getattr(args, f.name) for f in dataclasses.fields(SuperpixelConfig)
                 if getattr(args, f.name) is not None})
    try:
        cfg = build(SuperpixelConfig, tree, args.config or "<command line>")
    except ConfigError as err:
        parser.error(str(err))
    if not cfg.cache_dir:
        parser.error("--cache-dir is required (or superpixels.cache_dir in --config)")
    paths = [str(p) for p in list_images(args.images, args.root)]
    print(f"{len(paths)} images, params {cfg.label_params()} -> {Path(cfg.cache_dir) / cfg.params_hash()}")
    try:
        report = precompute(paths, cfg, cfg.cache_dir, cfg.workers, args.on_bad_image, not args.no_progress)
    except BadImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, reason in sorted(report.bad.items()):
        print(f"bad image: {path}: {reason}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
