"""Synthetic inputs shared by tests and benchmarks: a tiny LFW (the real layout and protocol-file formats, small
generated faces) and random embedding stores (/embeddings and /labels written with h5py, as any tool may)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from PIL import Image

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


def write_store(
    path: Path | str,
    x: np.ndarray,
    labels: np.ndarray | None,
    pairs: np.ndarray | None = None,
    pair_labels: np.ndarray | None = None,
    pair_folds: np.ndarray | None = None,
    **attrs,
) -> Path:
    """A minimal store: /embeddings (float32 or float16 as given), /labels, optional /pairs."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=x, chunks=(min(len(x), 256) or 1, x.shape[1]) if len(x) else None)
        if labels is not None:
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        if pairs is not None:
            f.create_dataset("pairs", data=np.asarray(pairs, dtype=np.int64))
            f.create_dataset("pair_labels", data=np.asarray(pair_labels, dtype=np.int8))
            if pair_folds is not None:
                f.create_dataset("pair_folds", data=np.asarray(pair_folds, dtype=np.int8))
        f.attrs.update(attrs)
    return path


def random_labels(n: int, n_ids: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n_ids, size=n)


def random_store(
    path: Path | str,
    n: int,
    d: int,
    n_ids: int | None = None,
    seed: int = 0,
    duplicates: int = 0,
    dtype: str = "float32",
    signal: float = 0.5,
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Rows = identity centre * signal + noise, `duplicates` exact copies of earlier rows (ties);
    returns (path, x as stored, labels)."""
    rng = np.random.default_rng(seed)
    n_ids = n_ids or max(2, n // 3)
    labels = random_labels(n, n_ids, rng)
    centres = rng.standard_normal((n_ids, d)).astype(np.float32)
    x = (signal * centres[labels] + rng.standard_normal((n, d))).astype(np.float32)
    if duplicates:
        src = rng.integers(0, n, size=duplicates)
        dst = rng.choice(n, size=duplicates, replace=False)
        x[dst], labels[dst] = x[src], labels[src]
    x = x.astype(dtype)
    return write_store(path, x, labels), x, labels
