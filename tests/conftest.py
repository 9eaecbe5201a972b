"""Shared fixtures: a tiny generated LFW (real layout, real protocol-file formats) and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "squeezenet1_0-imagenet-dc.pth"

# name -> number of images. Test people: 4 identities (one singleton), train people: 5 identities.
TEST_PEOPLE = {"Alice_Able": 3, "Bob_Baker": 2, "Carol_Cole": 1, "Dan_Dorn": 4}
TRAIN_PEOPLE = {"Eve_Elm": 3, "Fay_Fox": 2, "Gus_Gray": 2, "Hal_Hunt": 1, "Ivy_Ives": 3}


def _face(rng: np.random.Generator, identity: int, size: int = 64) -> Image.Image:
    """A small RGB image whose colour depends on the identity, plus per-image noise."""
    base = np.full((size, size, 3), (identity * 53 % 255, identity * 97 % 255, identity * 31 % 255), np.float64)
    img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _same_diff(people: dict[str, int]) -> tuple[list[str], list[str]]:
    names = sorted(people)
    same = [f"{n}\t1\t{k}" for n in names if people[n] > 1 for k in range(2, people[n] + 1)]
    diff = [f"{a}\t1\t{b}\t1" for i, a in enumerate(names) for b in names[i + 1 :]]
    return same, diff


def make_tiny_lfw(root: Path, image_set_dir: str = "lfw-deepfunneled", torchvision_layout: bool = True) -> Path:
    """Write a tiny LFW under `root` (in `root/lfw-py/` when `torchvision_layout`); returns `root`."""
    base = root / "lfw-py" if torchvision_layout else root
    rng = np.random.default_rng(0)
    everyone = {**TEST_PEOPLE, **TRAIN_PEOPLE}
    for ident, (name, n) in enumerate(sorted(everyone.items())):
        (base / image_set_dir / name).mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            _face(rng, ident).save(base / image_set_dir / name / f"{name}_{k:04d}.jpg", quality=90)
    for split, people in (("Test", TEST_PEOPLE), ("Train", TRAIN_PEOPLE)):
        lines = [str(len(people))] + [f"{n}\t{c}" for n, c in sorted(people.items())]
        (base / f"peopleDev{split}.txt").write_text("\n".join(lines) + "\n")
        same, diff = _same_diff(people)
        k = min(len(same), len(diff))
        (base / f"pairsDev{split}.txt").write_text("\n".join([str(k), *same[:k], *diff[:k]]) + "\n")
    # View 2: 10 folds of 1 same + 1 different pair, drawn from everyone.
    same, diff = _same_diff(everyone)
    folds = [line for f in range(10) for line in (same[f % len(same)], diff[f % len(diff)])]
    (base / "pairs.txt").write_text("\n".join(["10\t1", *folds]) + "\n")
    return root


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
