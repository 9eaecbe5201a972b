"""Score calibration from counts: a logistic map from score to log-likelihood ratio (llr = slope * s + offset),
its cost Cllr, the least cost any monotone map reaches (minCllr, by pool-adjacent-violators) and the
reliability of the map per group of scores. Stateless functions of scores and per-score counts, in the style
of bob.measure's `calibration` module: a score here is a histogram bin's centre with its same-person and
different-person counts (or one pair's score with counts 1 and 0), so every pair of an all-pairs result takes
part at the cost of its bins.

The score is in its own units, larger meaning more alike: the cosine (after score offsets) or minus the
Euclidean distance (`bin_scores`). The llr is in natural-log units. The fit is prior-independent as in
Brummer's FoCal and bob.measure: logistic regression at the prior `prior` (each class weighs its share, the
same-person class `prior`, whatever the counts) with the prior's log-odds removed from the output, so that at
prior 0.5 it is the class-balanced logistic regression without regularisation.

    Cllr = (mean over same-person pairs of log2(1 + e^-llr) + mean over different-person pairs of
            log2(1 + e^llr)) / 2
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.binning import Binning

LN2 = math.log(2.0)


def bin_scores(binning: Binning) -> np.ndarray:
    """The score of each bin's centre in its own units (larger: more alike): the cosine, or minus the Euclidean
    distance (the bins of l2 hold squared distances)."""
    edges = binning.edges()
    centres = 0.5 * (edges[:-1] + edges[1:])
    m = binning.metric
    return -m.to_distance(centres) if m.low_is_similar else centres


def _occupied(scores, pos, neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 scores and counts of the entries that hold any pair; a ValueError when a class is empty."""
    s, p, n = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (scores, pos, neg))
    if not s.shape == p.shape == n.shape:
        raise ValueError(f"scores {s.shape} and counts {p.shape}, {n.shape} differ in length")
    if p.sum() <= 0 or n.sum() <= 0:
        raise ValueError("calibration needs same-person and different-person pairs: one class is empty")
    keep = (p > 0) | (n > 0)
    return s[keep], p[keep], n[keep]


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def logistic_fit(scores, pos, neg, prior: float = 0.5, tol: float = 1e-12,
                 max_iter: int = 100) -> tuple[float, float]:  # fmt: skip
    """(slope, offset) of llr = slope * score + offset: the weighted logistic regression of the same-person flag
    on the score, each class weighing its share of `prior` (counts `pos`, `neg` per score), the prior's
    log-odds removed (Newton's method with step halving, on the standardised score). A ValueError when the
    scores separate the classes completely (no finite slope)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be between 0 and 1, not {prior}")
    s, p, n = _occupied(scores, pos, neg)
    if s[p > 0].min() >= s[n > 0].max():
        raise ValueError("the scores separate same-person and different-person pairs completely: the logistic "
                         "calibration has no finite slope")  # fmt: skip
    wp, wn = prior * p / p.sum(), (1.0 - prior) * n / n.sum()
    w = wp + wn
    mean = float(w @ s)
    sd = float(np.sqrt(w @ (s - mean) ** 2)) or 1.0
    z, tau = (s - mean) / sd, math.log(prior / (1.0 - prior))

    def loss(theta: np.ndarray) -> float:
        t = theta[0] * z + theta[1] + tau
        return float(wp @ _softplus(-t) + wn @ _softplus(t))

    theta, current = np.zeros(2), loss(np.zeros(2))
    for _ in range(max_iter):
        sig = 0.5 * (1.0 + np.tanh(0.5 * (theta[0] * z + theta[1] + tau)))  # sigmoid without overflow
        r, h = w * sig - wp, w * sig * (1.0 - sig)
        grad = np.array([r @ z, r.sum()])
        hess = np.array([[h @ (z * z), h @ z], [h @ z, h.sum()]])
        step = np.linalg.solve(hess + 1e-300 * np.eye(2), grad)
        scale = 1.0
        while scale > 1e-10 and loss(theta - scale * step) > current:
            scale *= 0.5
        theta = theta - scale * step
        current = loss(theta)
        if np.abs(scale * step).max() < tol:
            break
    slope = theta[0] / sd
    return float(slope), float(theta[1] - slope * mean)


def cllr(llr, pos, neg) -> float:
    """Cllr in bits of log-likelihood ratios `llr` (natural-log units) with their same-person and
    different-person counts: 0 for a perfect system, 1 for one that always says llr = 0."""
    llr, p, n = _occupied(llr, pos, neg)
    return 0.5 * float(p @ _softplus(-llr) / p.sum() + n @ _softplus(llr) / n.sum()) / LN2


def pav_llr(scores, pos, neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best monotone map of the occupied scores to llr (pool-adjacent-violators on the same-person rate in
    increasing score, equal scores pooled, the counts' own prior log-odds removed): (llr, pos, neg), scores
    ascending; +-inf where a pool holds one class only."""
    from scipy.optimize import isotonic_regression

    s, p, n = _occupied(scores, pos, neg)
    order = np.argsort(s, kind="stable")
    s, p, n = s[order], p[order], n[order]
    rate = isotonic_regression(p / (p + n), weights=p + n, increasing=True).x
    with np.errstate(divide="ignore"):
        log_odds = np.log(rate) - np.log1p(-rate)
    return log_odds - math.log(p.sum() / n.sum()), p, n


def min_cllr(scores, pos, neg) -> float:
    """The least Cllr any monotone (non-decreasing) map of the scores to llr reaches: Cllr of `pav_llr`. Only
    the scores' order counts: a measure of discrimination in Cllr's units (minCllr <= Cllr of any monotone
    calibration of the same scores)."""
    llr, p, n = pav_llr(scores, pos, neg)
    cost_pos = np.where(p > 0, _softplus(-llr), 0.0)  # a pool of different-person pairs alone: llr -inf, p 0
    cost_neg = np.where(n > 0, _softplus(llr), 0.0)
    return 0.5 * float(p @ cost_pos / p.sum() + n @ cost_neg / n.sum()) / LN2


def reliability(llr, pos, neg, groups: int = 20) -> dict[str, np.ndarray]:
    """Predicted against observed same-person rate at equal priors per group of scores: the occupied entries in
    increasing llr cut into `groups` groups of about equal class-balanced mass (an entry is never split).
    Per group: `predicted` (mean of 1 / (1 + e^-llr)), `observed` (the share of the group's balanced mass that
    is same-person), `predicted_llr` (mean llr), `observed_llr` (log of the group's same-person share of all
    same-person pairs over its different-person share; +-inf for a group of one class) and `pairs`; each mean
    weighted by the class-balanced mass (each class half)."""
    llr, p, n = _occupied(llr, pos, neg)
    order = np.argsort(llr, kind="stable")
    llr, fp, fn = llr[order], p[order] / p.sum(), n[order] / n.sum()
    mass = 0.5 * (fp + fn)
    group = np.minimum((np.cumsum(mass) - 0.5 * mass) * groups, groups - 1).astype(np.int64)
    sums = {k: np.bincount(group, weights=v, minlength=groups) for k, v in (
        ("mass", mass), ("fp", fp), ("fn", fn), ("pairs", p[order] + n[order]),
        ("prob", mass * 0.5 * (1.0 + np.tanh(0.5 * llr))), ("llr", mass * llr))}  # fmt: skip
    used = sums["mass"] > 0
    m = sums["mass"][used]
    with np.errstate(divide="ignore"):
        observed_llr = np.log(sums["fp"][used]) - np.log(sums["fn"][used])
    return {
        "predicted": sums["prob"][used] / m,
        "observed": 0.5 * sums["fp"][used] / m,
        "predicted_llr": sums["llr"][used] / m,
        "observed_llr": observed_llr,
        "pairs": sums["pairs"][used],
    }


__all__ = ["bin_scores", "cllr", "logistic_fit", "min_cllr", "pav_llr", "reliability"]
