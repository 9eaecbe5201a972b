"""Paired comparisons of two systems scored on the same pairs: the difference B - A of a metric with a 95%
interval and a two-sided p-value that respect how the pairs depend on each other.

- All pairs: a paired delete-a-group jackknife. The difference is recomputed without the pairs that touch each
  group of identities, in both results at once (`pipeline.metrics.intervals.group_replicates`: the same groups,
  since the pairs are the same); `se^2 = (G-1)/G sum (d_g - mean)^2` over the replicates d_g of the difference,
  interval `d +- 1.96 se`, p-value from the normal approximation `2 (1 - Phi(|d| / se))`.
- Listed pairs: a paired bootstrap over the pairs, the same resampled pairs for A and B (seeded): the percentile
  interval of the resampled differences and the p-value of `d / sd` under the normal approximation (pROC's
  bootstrap test, `roc.test(method = "bootstrap")`); and DeLong's test of two correlated AUCs (DeLong, DeLong and
  Clarke-Pearson 1988, in Sun and Xu's 2014 midrank form) as a cross-check of the AUC.

A difference with no spread (a result compared with itself) has the interval [d, d] and p = 1 when d = 0.
Scores are similarities (higher: more alike); ties count one half.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.binning import COSINE
from pipeline.metrics.intervals import ROUNDS, Z95, resampled_metrics

NAMES = ("auc", "eer")
"""The metrics compared besides TAR at each FAR level."""


def normal_p(difference: float, se: float) -> float:
    """Two-sided p-value of `difference` with standard error `se` (normal approximation); with no spread, 1 for
    no difference and 0 for any other."""
    if not (math.isfinite(difference) and math.isfinite(se)):
        return float("nan")
    if se <= 0:
        return 1.0 if difference == 0 else 0.0
    return math.erfc(abs(difference) / se / math.sqrt(2.0))


def entry(a: float | None, b: float | None, ci95: list[float] | None, p_value: float | None, **more) -> dict:
    """One compared metric: `{"a", "b", "difference": b - a, "ci95", "p_value"}` (all null without a or b)."""
    if a is None or b is None:
        return {"a": a, "b": b, "difference": None, "ci95": None, "p_value": None, **more}
    return {"a": a, "b": b, "difference": b - a, "ci95": ci95, "p_value": p_value, **more}


def jackknife_difference(a: float, b: float, reps_a: list, reps_b: list) -> dict:
    """`entry` of the difference b - a with the paired delete-a-group jackknife's interval and p-value, from the
    two results' replicates of the same groups (None entries: a replicate that does not reach the metric, then no
    interval)."""
    if len(reps_a) != len(reps_b):
        raise ValueError(f"{len(reps_a)} and {len(reps_b)} replicates: not the same groups")
    if None in reps_a or None in reps_b or len(reps_a) < 2:
        return entry(a, b, None, None)
    d = np.asarray(reps_b, dtype=np.float64) - np.asarray(reps_a, dtype=np.float64)
    g = len(d)
    se = math.sqrt((g - 1) / g * float(((d - d.mean()) ** 2).sum()))
    diff = b - a
    return entry(a, b, [diff - Z95 * se, diff + Z95 * se], normal_p(diff, se), se=se)


def bootstrap_differences(scores_a: np.ndarray, scores_b: np.ndarray, positive: np.ndarray, far_levels,
                          seed: int = 0, rounds: int = ROUNDS) -> dict[str, np.ndarray]:  # fmt: skip
    """Differences B - A of AUC, EER and TAR at each FAR level (key `f"{f:g}"`) over `rounds` resamples of the
    pairs, the same pairs for both (similarities, higher: more alike); rounds that lack pairs of a kind are left
    out."""
    rng = np.random.default_rng(seed)
    n = len(positive)
    out: dict[str, list[float]] = {k: [] for k in (*NAMES, *(f"{f:g}" for f in far_levels))}
    for _ in range(rounds):
        i = rng.integers(0, n, size=n)
        ra = resampled_metrics(scores_a[i], positive[i], COSINE, far_levels)
        if ra is None:
            continue
        rb = resampled_metrics(scores_b[i], positive[i], COSINE, far_levels)
        out["auc"].append(rb[0] - ra[0])
        out["eer"].append(rb[1] - ra[1])
        for k, v in rb[2].items():
            out[k].append(v - ra[2][k])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def bootstrap_entry(a: float | None, b: float | None, differences: np.ndarray) -> dict:
    """`entry` of b - a with the percentile interval of the resampled `differences` and the normal p-value of their
    spread."""
    if a is None or b is None or len(differences) < 2:
        return entry(a, b, None, None)
    se = float(differences.std(ddof=1))
    ci = [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))]
    return entry(a, b, ci, normal_p(b - a, se), se=se)


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x` with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def delong(scores_a: np.ndarray, scores_b: np.ndarray, positive: np.ndarray) -> dict:
    """DeLong's test of AUC_B - AUC_A on the same pairs (similarities): the AUCs, the difference, its standard
    error from the structural components' covariance, the 95% interval and the two-sided p-value."""
    positive = np.asarray(positive, dtype=bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least two pairs of each kind ({m} same, {n} different)")
    v10, v01, aucs = [], [], []
    for s in (scores_a, scores_b):
        s = np.asarray(s, dtype=np.float64)
        x, y = s[positive], s[~positive]
        tz = _midranks(np.concatenate([x, y]))
        tx, ty = _midranks(x), _midranks(y)
        aucs.append(float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)))
        v10.append((tz[:m] - tx) / n)  # per same-person pair: the share of different-person pairs below it
        v01.append(1.0 - (tz[m:] - ty) / m)  # per different-person pair: the share of same-person pairs above it
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    diff = aucs[1] - aucs[0]
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"auc_a": aucs[0], "auc_b": aucs[1], "difference": diff, "se": se,
            "ci95": [diff - Z95 * se, diff + Z95 * se], "z": z, "p_value": normal_p(diff, se)}  # fmt: skip


__all__ = [
    "NAMES",
    "bootstrap_differences",
    "bootstrap_entry",
    "delong",
    "entry",
    "jackknife_difference",
    "normal_p",
]
