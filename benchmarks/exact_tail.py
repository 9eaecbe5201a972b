"""Exact TAR at low FAR against scikit-learn: a random store (the scoring benchmark's, 3,708 x 1000 by default)
scored by `score --all-pairs`, its `tar_at_far` at every level compared with `sklearn.metrics.roc_curve` over the
float64 distances of every pair, in genuine pairs. Prints a table; `python -m benchmarks.exact_tail`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np

from benchmarks.bench_score import write_random_store


def sklearn_levels(x: np.ndarray, labels: np.ndarray, levels: list[str]) -> tuple[dict, int]:
    """scikit-learn's TAR at FAR over float64 distances of differences (identical rows: exactly 0)."""
    from scipy.spatial.distance import pdist
    from sklearn.metrics import roc_curve

    d = pdist(x.astype(np.float64))
    iu = np.triu_indices(len(x), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    fpr, tpr, _ = roc_curve(same, -d)
    return {k: float(tpr[fpr <= float(k)].max()) for k in levels}, int(same.sum())


@click.command("exact-tail")
@click.option("--n", type=int, default=3708, show_default=True)
@click.option("--dim", type=int, default=1000, show_default=True)
@click.option("--bins", type=int, default=1 << 18, show_default=True)
def command(n: int, dim: int, bins: int) -> None:
    """TAR at FAR of `score --all-pairs` against scikit-learn's exact ROC."""
    import h5py

    from pipeline.scoring.stage import ScoreConfig, score

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_store(Path(tmp) / "s.h5", n, dim)
        m = score(ScoreConfig(store=path, bins=bins, progress=False))
        with h5py.File(path, "r") as f:
            x, labels = f["embeddings"][...], f["labels"][...]
    ref, n_pos = sklearn_levels(x, labels, list(m["tar_at_far"]))
    print(
        f"| FAR | TAR ours | TAR scikit-learn | difference in genuine pairs | exact (tail) |  ({n} x {dim}, {n_pos} same)"
    )
    print("| --- | --- | --- | --- | --- |")
    for k, tar in m["tar_at_far"].items():
        exact = float(k) <= m["tail_exact_far"]
        print(f"| {k} | {tar:.6f} | {ref[k]:.6f} | {(tar - ref[k]) * n_pos:+.1f} | {'yes' if exact else 'bins'} |")
    print(json.dumps({"auc": m["auc"], "auc_ci95": m["auc_ci95"], "tail_exact_far": m["tail_exact_far"]}))


if __name__ == "__main__":
    command()
