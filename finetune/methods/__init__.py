"""The method registry: ``model.method`` names the few-shot segmenter, built by :func:`build_method`.

Registered: ``qgnet`` (the paper's model), ``pfenet`` (QGNet without the prior), ``prototype`` (a
training-free masked-average-prototype baseline), ``ssp`` (self-support prototypes; training-free unless
``model.train_layers`` or ``model.adapter``), ``qsm`` (query self-similarity prototyping, on SSP) and
``ntrenet`` (non-target region eliminating) and ``bam`` (base and meta learners, its base stage
``train.stage=base``). A new method is one module here that registers its builder (see
``docs/architecture.md``).
"""

from __future__ import annotations

from finetune.methods import bam, ntrenet, prototype, qgnet, qsm, ssp  # noqa: F401  (importing registers them)
from finetune.methods.base import METHODS, FewShotMethod, register
from finetune.model.config import ModelConfig

__all__ = ["METHODS", "FewShotMethod", "build_method", "register"]


def build_method(cfg: ModelConfig) -> FewShotMethod:
    """The segmenter ``cfg.method`` names, built from the ``model.*`` config."""
    if cfg.method not in METHODS:
        raise ValueError(f"model.method={cfg.method!r} is not registered; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method](cfg)
