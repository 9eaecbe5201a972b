"""A threshold carried from one set of pairs to another (`score --threshold-from`): the threshold that gives a
false accept rate on one set, the rates it gives on another, counted from exact scores or bounded by the bins,
and one-sided upper confidence bounds of those rates.

Scores are in the score's own units, larger = more similar: the cosine (after score offsets) or minus the
Euclidean distance, so a threshold means the same on every set. A pair is accepted when its score is at least
the threshold.

The threshold for FAR f on N different-person pairs follows scikit-learn's `roc_curve` points (and
`pipeline.metrics.tail.Tail.tar_at`): m = floor(f N) false accepts allowed, the (m+1)-th most similar
different-person pair is rejected with everything tied to it, and the threshold is the least similar score still
accepted (the operating point's score), so the set accepts exactly what TAR at FAR f counts.

Bounds (one-sided, `LEVEL`): Clopper-Pearson for k events in n independent pairs, the Beta(k+1, n-k) quantile;
for all pairs, whose pairs share people, also the delete-a-group jackknife over identity groups (`rate +
z se`), the larger counting.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from pipeline.metrics.binning import Binning, Metric

LEVEL = 0.95
"""One-sided confidence level of the upper bounds."""


def to_scores(values: np.ndarray, metric: Metric) -> np.ndarray:
    """Binned values (squared distances for l2, cosines) -> scores (minus the distance, the cosine), float64."""
    values = np.asarray(values, dtype=np.float64)
    return -np.sqrt(np.clip(values, 0.0, None)) if metric.low_is_similar else values


def coordinates_to_scores(coords: np.ndarray, binning: Binning) -> np.ndarray:
    """Bin coordinates (the exact tail's float32 values) -> scores, in float64 (monotone: order and ties kept)."""
    b = binning
    return to_scores(b.lo + np.asarray(coords, dtype=np.float64) * ((b.hi - b.lo) / b.bins), b.metric)


def allowed_false_accepts(far: float, n_negative: int) -> int:
    """m = floor(f N): the false accepts FAR f allows (1e-9 absorbs decimal levels, as `Tail.tar_at`)."""
    return math.floor(far * n_negative + 1e-9)


def threshold_at_far(neg: np.ndarray, pos: np.ndarray, far: float, n_negative: int) -> float:
    """The threshold that gives FAR `far` on a set of `n_negative` different-person pairs: `neg`, scores in
    decreasing order, holds at least their m+1 most similar (m = floor(f N) >= 1); `pos` every same-person score
    above the (m+1)-th (more may be given). The least similar score accepted once the (m+1)-th and its ties are
    rejected; just above the (m+1)-th when nothing more similar is left. ValueError when the set cannot show the
    level (m = 0) or `neg` does not reach it."""
    m = allowed_false_accepts(far, n_negative)
    if m < 1:
        raise ValueError(f"FAR {far:g} is not measurable with {n_negative:,} different-person pairs (f N < 1)")
    if m >= len(neg):
        raise ValueError(f"the {len(neg):,} most similar different-person scores held do not reach FAR {far:g}")
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    edge = neg[m]
    above = np.r_[neg[:m][neg[:m] > edge], pos[pos > edge]]
    return float(above.min()) if above.size else float(np.nextafter(edge, np.inf))


def accepted(scores: np.ndarray, threshold: float) -> int:
    """How many of `scores` are accepted: at least `threshold`."""
    return int(np.count_nonzero(np.asarray(scores) >= threshold))


def binned_accepted(counts: np.ndarray, binning: Binning, threshold: float) -> tuple[int, int]:
    """(fewest, most) of the pairs counted per bin (`counts`, in `binning`'s order) that are accepted at
    `threshold`: a bin wholly at least as similar counts, the bin the threshold falls in (a neighbour too when
    it sits on an edge) may count either way. The edge bins reach out to everything beyond the range."""
    edges = binning.edges()
    edges[0], edges[-1] = -np.inf, np.inf
    s = to_scores(edges, binning.metric)
    low, high = np.minimum(s[:-1], s[1:]), np.maximum(s[:-1], s[1:])
    tol = 1e-9 * (abs(threshold) + abs(binning.hi - binning.lo))  # rounding of a value on a bin's edge
    counts = np.asarray(counts, dtype=np.int64)
    return int(counts[low - tol >= threshold].sum()), int(counts[high + tol >= threshold].sum())


def clopper_pearson_upper(k: int, n: int, level: float = LEVEL) -> float:
    """One-sided upper confidence bound of a rate seen `k` times in `n` independent trials (Clopper-Pearson: the
    p at which k or fewer events have probability 1 - level): Beta(k+1, n-k)'s `level` quantile, 1 when k = n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, not k {k}, n {n}")
    if k == n:
        return 1.0
    from scipy.special import betaincinv  # here: scipy comes with scikit-learn; most commands never need it

    return float(betaincinv(k + 1, n - k, level))


def jackknife_upper(rate: float, replicates: list[float], level: float = LEVEL) -> float | None:
    """One-sided upper bound `rate + z se` of the delete-a-group jackknife (`se^2 = (G-1)/G sum (r_g - mean)^2`),
    at most 1; None with fewer than two replicates."""
    r = np.asarray(replicates, dtype=np.float64)
    if len(r) < 2 or not math.isfinite(rate):
        return None
    g = len(r)
    se = math.sqrt((g - 1) / g * float(((r - r.mean()) ** 2).sum()))
    return min(1.0, rate + NormalDist().inv_cdf(level) * se)


def group_rates(ids: np.ndarray, totals: np.ndarray, group_rows: np.ndarray) -> list[float]:
    """The jackknife's replicates of a rate: for each group g with rows, the events (`ids`: the group-pair id
    `a G + b` of each event's pair) over the pairs (`totals`, per group-pair id) that touch no identity of g;
    groups that leave no pairs give no replicate."""
    g_count = len(group_rows)
    totals = np.asarray(totals, dtype=np.int64).reshape(g_count * g_count)
    hits = np.bincount(np.asarray(ids, dtype=np.int64), minlength=g_count * g_count)
    a, b = np.divmod(np.arange(g_count * g_count), g_count)
    out = []
    for g in np.flatnonzero(group_rows):
        keep = (a != g) & (b != g)
        n = int(totals[keep].sum())
        if n:
            out.append(int(hits[keep].sum()) / n)
    return out


__all__ = [
    "LEVEL",
    "accepted",
    "allowed_false_accepts",
    "binned_accepted",
    "clopper_pearson_upper",
    "coordinates_to_scores",
    "group_rates",
    "jackknife_upper",
    "threshold_at_far",
    "to_scores",
]
