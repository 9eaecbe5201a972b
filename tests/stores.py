"""Random embedding stores for scoring tests and benchmarks: /embeddings and /labels written with h5py."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


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
