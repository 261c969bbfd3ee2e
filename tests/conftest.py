"""Shared fixtures: where the real data and weights live (CI has them beside the clone; a fresh clone does not)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QGNET_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real image/mask sets); the test is skipped when it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set QGNET_SHARED to its parent)")
    return path


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """Real ImageNet MobileNetV2 weights (torchvision names, safetensors); skipped when absent."""
    path = SHARED / "weights" / "mobilenet_v2_imagenet_features.safetensors"
    if not path.is_file():
        pytest.skip(f"MobileNetV2 weights not found at {path}")
    return path


@pytest.fixture
def one_thread():
    """One torch thread for the test: small inputs gain nothing from a second one, and on a CPU shared with
    other jobs two threads stall each other (many times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
