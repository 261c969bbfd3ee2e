"""Benchmark name -> class, and one function that builds a split from the ``data.*`` config."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fewshot.data.base import FewShotBenchmark
from fewshot.data.coco import Coco20i
from fewshot.data.config import DataConfig
from fewshot.data.fss import Fss1000
from fewshot.data.pascal import Pascal5i
from fewshot.data.semantic import SemanticFolder
from fewshot.data.synthetic import SyntheticFss

BENCHMARKS: dict[str, type[FewShotBenchmark]] = {
    "pascal5i": Pascal5i,
    "coco20i": Coco20i,
    "fss1000": Fss1000,
    "synthetic": SyntheticFss,
    "semantic": SemanticFolder,
}

# Cross-domain targets (PATNet protocol) live in fewshot.data.crossdomain; registered when it is importable.
CROSS_DOMAIN = {"isic": "Isic2018", "chest_xray": "ChestXray", "deepglobe": "Deepglobe", "kvasir": "KvasirSeg",
                "wbc": "Wbc", "chaos_mri": "ChaosMri", "suim": "Suim"}
try:
    from fewshot.data import crossdomain as _crossdomain
except ModuleNotFoundError as err:
    if err.name != "fewshot.data.crossdomain":  # the module exists but one of its imports is broken
        raise
else:
    BENCHMARKS.update({name: getattr(_crossdomain, cls) for name, cls in CROSS_DOMAIN.items()
                       if hasattr(_crossdomain, cls)})


def _pascal(cfg: DataConfig, split: str) -> FewShotBenchmark:
    return Pascal5i(cfg.root, cfg.fold, split, cfg.min_pixels, cfg.val_fraction, cfg.val_seed, cfg.index_only,
                    cfg.cache_dir)


def _coco(cfg: DataConfig, split: str) -> FewShotBenchmark:
    return Coco20i(cfg.root, cfg.fold, split, cfg.coco_year, cfg.min_pixels, cfg.val_fraction, cfg.val_seed,
                   cfg.cache_dir)


def _fss(cfg: DataConfig, split: str) -> FewShotBenchmark:
    return Fss1000(cfg.root, split, classes=cfg.fss_classes.get(split) or None)


def _synthetic(cfg: DataConfig, split: str) -> FewShotBenchmark:
    return SyntheticFss(Path(cfg.root).expanduser() / "synthetic_fss", split, cfg.synthetic_classes,
                        cfg.synthetic_per_class, cfg.synthetic_size, cfg.synthetic_seed)


def _semantic(cfg: DataConfig, split: str) -> FewShotBenchmark:
    # validation classes are carved over every source by fewshot.data.sources; the folder's own 'val' split is
    # its classes.json 'val' image list (or explicit semantic_classes.val)
    return SemanticFolder(cfg.root, split, cfg.fold, cfg.semantic_folds, cfg.semantic_classes or None,
                          None, 0.0, cfg.val_seed, cfg.min_pixels, cfg.cache_dir)


def _cross_domain(name: str) -> Callable[[DataConfig, str], FewShotBenchmark]:
    """Cross-domain sets are test-only; ``root`` may be $FSS_DATA (holding the set's folder) or the folder."""
    def build(cfg: DataConfig, split: str) -> FewShotBenchmark:
        if split != "test":
            raise ValueError(f"{name} is a cross-domain test set: split must be 'test', got {split!r}")
        cls = BENCHMARKS[name]
        root = Path(cfg.root).expanduser()
        subdir = getattr(cls, "DEFAULT_SUBDIR", "")
        return cls(root / subdir if subdir and (root / subdir).is_dir() else root)
    return build


BUILDERS: dict[str, Callable[[DataConfig, str], FewShotBenchmark]] = {
    "pascal5i": _pascal, "coco20i": _coco, "fss1000": _fss, "synthetic": _synthetic, "semantic": _semantic,
    **{name: _cross_domain(name) for name in CROSS_DOMAIN if name in BENCHMARKS},
}


def build_benchmark(cfg: DataConfig, split: str) -> FewShotBenchmark:
    """The ``split`` ('train', 'val', 'test'; FSS layouts also 'all') of ``cfg.benchmark``."""
    if cfg.benchmark not in BUILDERS:
        raise ValueError(f"data.benchmark={cfg.benchmark!r} is not one of {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.benchmark](cfg, split)
