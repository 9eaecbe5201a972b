"""`compare`'s paired jackknife against brute force on real results: two all-pairs results folders A and B of the
same pairs, every pair's score recomputed in float64 from their stores (`ScoreDefinition.listed_values`, as listed
pairs are scored, with the metric and score offsets each result was scored with), and for each group of
identities the exact AUC, EER and TAR at FAR of both without the pairs that touch it. Prints the difference and
its jackknife standard error both ways; `python -m benchmarks.paired_jackknife A B` or `cli.py bench
paired-jackknife A B` (LFWPeople test's 6.87 M pairs: 1 GB, 2.4 min on the shared 2-core CPU)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def pair_scores(metrics: dict) -> tuple[np.ndarray, np.ndarray]:
    """(similarity of every pair i < j in float64, labels) of the store a results folder was scored from."""
    from pipeline.metrics.binning import as_metric
    from pipeline.scoring.definition import ScoreDefinition
    from pipeline.store.layout import open_store

    with open_store(metrics["store"]) as store:
        score = ScoreDefinition.of(store, metrics["metric"], (metrics.get("config") or {}).get("score_norm", True))
        x, labels = store.rows(0, store.n).astype(np.float64), store.labels.copy()
    i, j = np.triu_indices(len(x), 1)
    step = 1 << 16  # pairs per chunk: two [step, dim] float64 gathers
    values = np.concatenate([score.listed_values(x, np.stack([i[k : k + step], j[k : k + step]], 1))
                             for k in range(0, len(i), step)])  # fmt: skip
    m = as_metric(metrics["metric"])
    return (-np.sqrt(np.clip(values, 0, None)) if m.low_is_similar else values), labels


def exact(scores: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """AUC, EER and TAR at each FAR (keys as metrics.json's) of similarities, exactly."""
    from pipeline.metrics.curve import equal_error_rate, exact_counts

    pos, neg, _ = exact_counts(scores, same, "cosine")
    p, q = pos.sum(), neg.sum()
    tpr, fpr = np.r_[0.0, np.cumsum(pos) / p], np.r_[0.0, np.cumsum(neg) / q]
    out = {"auc": float(np.dot(neg, np.cumsum(pos) - pos + 0.5 * pos) / (p * q)), "eer": equal_error_rate(fpr, tpr)}
    return out | {f"{f:g}": float(tpr[fpr <= f].max()) for f in FARS}


@click.command("paired-jackknife")
@click.argument("a", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("b", type=click.Path(path_type=Path, exists=True, file_okay=False))
def command(a: Path, b: Path) -> None:
    """compare's paired jackknife of all pairs against a brute-force one from per-pair scores."""
    from pipeline.metrics.intervals import GROUPS, identity_groups
    from pipeline.report.compare import compare, read_scored

    t0 = time.perf_counter()
    ours = compare(read_scored(a), read_scored(b))
    (sa, labels), (sb, lb) = (pair_scores(json.loads((f / "metrics.json").read_text())) for f in (a, b))
    if not np.array_equal(labels, lb):
        raise click.UsageError("A and B come from stores of other labels")
    i, j = np.triu_indices(len(labels), 1)
    same, g = labels[i] == labels[j], identity_groups(labels)
    gi, gj = g[i], g[j]
    full = {k: v - w for (k, v), w in zip(exact(sb, same).items(), exact(sa, same).values(), strict=True)}
    reps = []
    for grp in range(GROUPS):
        keep = (gi != grp) & (gj != grp)
        ra, rb = exact(sa[keep], same[keep]), exact(sb[keep], same[keep])
        reps.append({k: rb[k] - ra[k] for k in ra})
    print(f"| metric | B - A compare | B - A brute force | se compare | se brute force | ratio |  ({len(same):,} pairs, "
          f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for k in full:
        r = np.array([x[k] for x in reps])
        se = math.sqrt((GROUPS - 1) / GROUPS * float(((r - r.mean()) ** 2).sum()))
        e = ours[k] if k in ("auc", "eer") else ours["tar_at_far"][k]
        if e["difference"] is None:  # a level these pairs cannot show
            continue
        mine = e.get("se")
        ratio = f"{mine / se:.4f}" if mine is not None and se > 0 else "-"
        print(f"| {k} | {e['difference']:+.6f} | {full[k]:+.6f} | {mine if mine is None else f'{mine:.6f}'} | "
              f"{se:.6f} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    command()
