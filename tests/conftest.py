"""Shared fixtures: a tiny generated LFW (real layout, real protocol-file formats) and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.synthetic import TEST_PEOPLE, TRAIN_PEOPLE, make_tiny_lfw  # noqa: F401 (tests import them from here)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "squeezenet1_0-imagenet-dc.pth"


@pytest.fixture
def tiny_lfw(tmp_path: Path) -> Path:
    """A data root with a tiny deep-funneled LFW in torchvision's layout."""
    return make_tiny_lfw(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real LFW (LFW_ROOT or ../shared/data); skips where it is absent."""
    root = Path(os.environ.get("LFW_ROOT", SHARED / "data"))
    if not (root / "lfw-py" / "lfw-deepfunneled").is_dir() and not (root / "lfw-deepfunneled").is_dir():
        pytest.skip(f"real LFW not found at {root} (set LFW_ROOT or provide ../shared/data)")
    return root


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """The real ImageNet SqueezeNet state_dict from ../shared; skips where it is absent."""
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} not found")
    return SHARED_WEIGHTS
