"""ROC curves and their metrics from counts ordered most similar first (exact groups of distinct values, or
histogram bins): AUC with its binning bound, EER, TAR at FAR, best accuracies; and the exact counts of scores.

AUC counts a (positive, negative) pair of pairs as 1 when the positive is more similar, 1/2 on a tie. From
histograms every such pair is decided exactly unless both fall in the same bin, where it counts 1/2; the true
count there is 0, 1/2 or 1, so `|auc - exact| <= sum_k pos_k * neg_k / (2 P N)`: `auc_error_bound`.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import as_metric

FAR_LEVELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def exact_counts(values: np.ndarray, positive: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC groups: (pos, neg, distance) per distinct value, most similar first (ties share a group)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    m = as_metric(metric)
    uniq, inverse = np.unique(m.key(values), return_inverse=True)  # ascending key = less similar
    pos = np.bincount(inverse, weights=positive, minlength=len(uniq)).round().astype(np.int64)
    neg = np.bincount(inverse, minlength=len(uniq)).astype(np.int64) - pos
    return pos, neg, m.to_distance(m.key(uniq))


def exact_auc(values: np.ndarray, positive: np.ndarray, metric: str) -> float:
    """AUC by sorting (ties one half): the check for the histogram AUC, O(M log M) time and O(M) memory."""
    pos, neg, _ = exact_counts(values, positive, metric)
    return auc_and_bound(pos, neg)[0]


def auc_and_bound(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC, binning bound) from counts ordered most similar first."""
    p, n = float(pos.sum()), float(neg.sum())
    posf, negf = pos.astype(np.float64), neg.astype(np.float64)
    tp_before = np.cumsum(posf) - posf
    auc = float(np.dot(negf, tp_before + 0.5 * posf) / (p * n))
    bound = float(np.dot(posf, negf) / (2.0 * p * n))
    return auc, bound


def check_defined(n_pos: int, n_neg: int) -> None:
    if n_pos == 0 or n_neg == 0:
        which = "same-person" if n_pos == 0 else "different-person"
        raise PipelineError(
            f"no {which} pair among the scored pairs ({n_pos} same, {n_neg} different): ROC and AUC are undefined. "
            f"Score a store with at least one person shown twice and at least two people."
        )


def roc_metrics(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray, max_distance: float, exact: bool) -> dict:
    """Metrics from per-group counts ordered most similar first; `thresholds[k]` is the distance at or below
    which groups 0..k are accepted as the same person. `exact` groups are distinct values (no binning error)."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    check_defined(n_pos, n_neg)
    auc, bound = auc_and_bound(pos, neg)
    tpr = np.concatenate([[0.0], np.cumsum(pos) / n_pos])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / n_neg])
    thr = np.concatenate([[0.0 if len(thresholds) == 0 else min(0.0, float(thresholds[0]))], thresholds])
    tp, fp = np.concatenate([[0], np.cumsum(pos)]), np.concatenate([[0], np.cumsum(neg)])
    acc = (tp + n_neg - fp) / (n_pos + n_neg)  # at the pairs' own mix of same and different
    balanced = 0.5 * (tp / n_pos + (n_neg - fp) / n_neg)
    best, best_b = int(np.argmax(acc)), int(np.argmax(balanced))
    scale = max_distance if (math.isfinite(max_distance) and max_distance > 0) else float("nan")
    # the largest TPR with FPR <= f: both rise, so the last point with FPR <= f (fpr[0] = 0)
    tar = {f"{f:g}": float(tpr[np.searchsorted(fpr, f, side="right") - 1]) for f in FAR_LEVELS}
    return {
        "auc": auc,
        "auc_error_bound": 0.0 if exact else bound,
        "n_pairs": n_pos + n_neg,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "eer": equal_error_rate(fpr, tpr),
        "tar_at_far": tar,
        "fnmr_at_fmr": {k: 1.0 - v for k, v in tar.items()},
        "best_balanced_accuracy": float(balanced[best_b]),
        "best_balanced_threshold": float(thr[best_b]),
        "best_balanced_threshold_normalised": float(thr[best_b] / scale),
        "best_unbalanced_accuracy": float(acc[best]),
        "best_unbalanced_threshold": float(thr[best]),
        "best_unbalanced_threshold_normalised": float(thr[best] / scale),
        "max_distance": float(max_distance),
        "roc": {"fpr": fpr, "tpr": tpr, "threshold": thr},
    }


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The rate where false accepts equal false rejects, linearly interpolated between ROC points."""
    diff = fpr - (1.0 - tpr)  # rises from -1 to +1
    k = int(np.argmax(diff >= 0))
    if k == 0:
        return float(fpr[0])
    d0, d1 = diff[k - 1], diff[k]
    t = -d0 / (d1 - d0)
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, steps: int = 4096) -> np.ndarray:
    """Indices of ROC points to keep for files and plots: each change of TPR or FPR by 1/steps, each step of
    log10 FPR by 1/steps of a decade, and the ends; the curve drawn through them differs by < 1/steps."""
    with np.errstate(divide="ignore"):
        logf = np.floor(np.log10(np.maximum(fpr, 1e-300)) * 500)
    keys = np.stack([np.floor(fpr * steps), np.floor(tpr * steps), logf], axis=1)
    change = np.ones(len(fpr), dtype=bool)
    change[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    keep = change | np.roll(change, -1)  # the last point before each change too
    keep[0] = keep[-1] = True
    return np.flatnonzero(keep)
