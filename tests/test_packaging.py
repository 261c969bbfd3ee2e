"""Our packages must import from this checkout, never from unrelated PyPI namesakes (queues, finetune...)."""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["common", "pretrain", "finetune", "superpixels", "queues"])
def test_package_resolves_to_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO), f"{name} imported from {module.__file__}"


@pytest.mark.parametrize("folder", ["configs", "launch"])
def test_data_folders_are_not_packages(folder):
    # `configs` and `launch` exist on PyPI; ours hold YAML and scripts only and must never shadow or be shadowed
    assert (REPO / folder).is_dir() and not (REPO / folder / "__init__.py").exists()
