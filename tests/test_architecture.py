"""The shape of the code: who may import whom, what the registry holds, and episode lists that never move."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common.config import load_config
from fewshot.data.episodes import episodes_hash, make_episodes
from fewshot.data.registry import build_benchmark
from finetune.config import FinetuneConfig, eval_spec

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "fewshot", "pretrain", "finetune", "superpixels", "queues")
# package -> project packages it must never import
FORBIDDEN = {
    "common": {"fewshot", "pretrain", "finetune", "superpixels", "queues"},
    "fewshot": {"pretrain", "finetune", "superpixels", "queues"},
    "pretrain": {"finetune"},
    "finetune": {"pretrain", "queues"},
    "superpixels": {"fewshot", "pretrain", "finetune"},
    "queues": {"fewshot", "pretrain", "finetune", "superpixels"},
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports (any import statement, also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_import_graph(package):
    offenders = {str(p.relative_to(REPO)): sorted(project_imports(p) & FORBIDDEN[package])
                 for p in (REPO / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}, "forbidden imports"


def test_no_file_reaches_into_another_package_by_path():
    for package in ("pretrain", "finetune"):
        other = "finetune" if package == "pretrain" else "pretrain"
        for path in (REPO / package).rglob("*.py"):
            assert f'"{other}"' not in path.read_text(), f"{path} builds a path into {other}/"


def test_registry_holds_the_documented_methods():
    from finetune.methods import METHODS

    assert {"qgnet", "pfenet", "prototype"} <= set(METHODS)


# The episode lists of the shipped runs, pinned: refactoring must never change which episodes a number is on.
PINNED = {
    "quickstart_cpu.yaml": {0: "f03613a0e6346c7c", 1: "50e6cb476e7da3c7"},
    "smoke_fss-mini_mnv2.yaml": {0: "e1c3012067df7d16", 1: "4bfb7a38810cdde5", 2: "98ff631aacacbe5d"},
    "smoke_cd-target_chest_xray.yaml": {0: "96630ae8ce401c23", 1: "5cbe84607d5ed983", 2: "688b748d7db19f70"},
    "smoke_cd-target_kvasir.yaml": {0: "85b02847110d7a58", 1: "06229eeaa71788e6", 2: "b07d00d6550756f9"},
}


def test_quickstart_episode_hashes_are_pinned(tmp_path):
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "quickstart_cpu.yaml",
                      [f"data.root={tmp_path}"])
    bench, spec = build_benchmark(cfg.data, cfg.eval.split), eval_spec(cfg)
    for seed, digest in PINNED["quickstart_cpu.yaml"].items():
        assert episodes_hash(make_episodes(bench, spec.shot, spec.episodes, seed, spec.query_order)) == digest


@pytest.mark.parametrize("config", ["smoke_fss-mini_mnv2.yaml", "smoke_cd-target_chest_xray.yaml",
                                    "smoke_cd-target_kvasir.yaml"])
def test_real_data_episode_hashes_are_pinned(config, shared_data):
    root = shared_data / ("fss-mini" if "fss-mini" in config else "cdfss-samples")
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / config, [f"data.root={root}"])
    bench, spec = build_benchmark(cfg.data, cfg.eval.split), eval_spec(cfg)
    for seed, digest in PINNED[config].items():
        assert episodes_hash(make_episodes(bench, spec.shot, spec.episodes, seed, spec.query_order)) == digest
