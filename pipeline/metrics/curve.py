"""ROC curves and their metrics from counts ordered most similar first (exact groups of distinct values, or
histogram bins): AUC with its binning bound, EER, TAR at FAR, best accuracies; and the exact counts of scores.

AUC counts a (positive, negative) pair of pairs as 1 when the positive is more similar, 1/2 on a tie. From
histograms every such pair is decided exactly unless both fall in the same bin, where it counts 1/2; the true
count there is 0, 1/2 or 1, so `|auc - exact| <= sum_k pos_k * neg_k / (2 P N)`: `auc_error_bound`.

With N different-person pairs a false accept rate f is observed only when it allows one false accept, f N >= 1
(`measurable`); below, TAR at FAR f and FNMR at FMR f are null, `smallest_measurable_far` (1/N) stands beside them
and `not_measurable` says why (`at_far`, the one place every path's values pass through).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import as_metric

FAR_LEVELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
EXACT_CHUNK = 1 << 16  # scores of each kind per chunk of exact groups (1 MB per array of a chunk)


def exact_counts(values: np.ndarray, positive: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC groups: (pos, neg, distance) per distinct value, most similar first (ties share a group)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    m = as_metric(metric)
    uniq, inverse = np.unique(m.key(values), return_inverse=True)  # ascending key = less similar
    pos = np.bincount(inverse, weights=positive, minlength=len(uniq)).round().astype(np.int64)
    neg = np.bincount(inverse, minlength=len(uniq)).astype(np.int64) - pos
    return pos, neg, m.to_distance(m.key(uniq))


def exact_groups(genuine: np.ndarray, impostor: np.ndarray, metric: str,
                 chunk: int = EXACT_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # fmt: skip
    """`exact_counts` of the scores `genuine` (same person) and `impostor` in chunks of at most 2 x `chunk`
    groups, most similar first. Both arrays are sorted in place (as keys: l2 values, negated cosines) and are all
    this holds besides one chunk: 8 bytes per score."""
    m = as_metric(metric)
    for v in (genuine, impostor):
        if not m.low_is_similar:
            np.negative(v, out=v)
        v.sort()
    # cut points: every chunk-th key of each, so that between two cuts lie at most `chunk` keys of each
    cuts = np.unique(np.concatenate([genuine[chunk::chunk], impostor[chunk::chunk]]))
    g_at = np.r_[0, np.searchsorted(genuine, cuts), len(genuine)]
    i_at = np.r_[0, np.searchsorted(impostor, cuts), len(impostor)]
    for k in range(len(cuts) + 1):
        g, i = genuine[g_at[k] : g_at[k + 1]], impostor[i_at[k] : i_at[k + 1]]
        keys = np.unique(np.concatenate([g, i]))
        if not len(keys):  # the keys below the first cut may all be cut points
            continue
        pos = np.searchsorted(g, keys, side="right") - np.searchsorted(g, keys, side="left")
        neg = np.searchsorted(i, keys, side="right") - np.searchsorted(i, keys, side="left")
        yield pos.astype(np.int64), neg.astype(np.int64), m.to_distance(m.key(keys))


def exact_metrics(genuine: np.ndarray, impostor: np.ndarray, metric: str, chunk: int = EXACT_CHUNK) -> dict:
    """`roc_metrics` of the exact groups of two score arrays (sorted in place, `exact_groups`); `max_distance` is
    the least similar score's distance."""
    m = as_metric(metric)
    sweep = None
    for pos, neg, thr in exact_groups(genuine, impostor, m, chunk):
        sweep = sweep or RocSweep(len(genuine), len(impostor), float(thr[0]) if len(thr) else 0.0)
        sweep.add(pos, neg, thr)
    if sweep is None:
        check_defined(len(genuine), len(impostor))
    last = [v[-1] for v in (genuine, impostor) if len(v)]  # sorted keys: the least similar is last
    max_distance = float(m.to_distance(m.key(np.array([max(last)])))[0])
    return sweep.metrics(max_distance, exact=True)


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
    sweep = RocSweep(int(pos.sum()), int(neg.sum()), 0.0 if len(thresholds) == 0 else float(thresholds[0]))
    sweep.add(pos, neg, thresholds)
    return sweep.metrics(max_distance, exact)


class RocSweep:
    """`roc_metrics` over groups given in chunks, most similar first (`add`), holding one chunk at a time: the
    exact groups of 10^7 scores and more (`exact_groups`). One chunk gives the whole curve; several give it thinned
    chunk by chunk (`thin_roc`'s points, and each chunk's last)."""

    def __init__(self, n_pos: int, n_neg: int, first_threshold: float):
        check_defined(n_pos, n_neg)
        self.p, self.n = n_pos, n_neg
        self.tp = self.fp = 0
        self.auc_sum, self.bound_sum = 0.0, 0.0
        t0 = min(0.0, first_threshold)  # point 0 accepts nothing
        self.best = {"acc": (n_neg / (n_pos + n_neg), t0), "bal": (0.5, t0)}
        self.tar = {f"{f:g}": 0.0 for f in FAR_LEVELS}
        self.eer: float | None = None
        self.last = (0.0, 0.0)  # (fpr, tpr) of the last point so far
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(np.zeros(1), np.zeros(1), np.array([t0]))]

    def add(self, pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray) -> None:
        p, n = self.p, self.n
        posf, negf = pos.astype(np.float64), neg.astype(np.float64)
        tp_before = np.cumsum(posf) - posf + self.tp
        self.auc_sum += float(np.dot(negf, tp_before + 0.5 * posf))
        self.bound_sum += float(np.dot(posf, negf))
        tp, fp = self.tp + np.cumsum(pos), self.fp + np.cumsum(neg)
        tpr, fpr = tp / p, fp / n
        for key, rate in (("acc", (tp + n - fp) / (p + n)), ("bal", 0.5 * (tp / p + (n - fp) / n))):
            k = int(np.argmax(rate))  # the first best point wins, as over the whole curve
            if rate[k] > self.best[key][0]:
                self.best[key] = (float(rate[k]), float(thresholds[k]))
        for f in FAR_LEVELS:  # the last point with FPR <= f: both rates rise
            k = int(np.searchsorted(fpr, f, side="right")) - 1
            if k >= 0:
                self.tar[f"{f:g}"] = float(tpr[k])
        if self.eer is None:
            self.eer = _eer_crossing(np.r_[self.last[0], fpr], np.r_[self.last[1], tpr])
        self.chunks.append((fpr, tpr, np.asarray(thresholds, dtype=np.float64)))
        if len(self.chunks) > 2:  # several chunks: keep the thinned curve only
            self.chunks = [_thinned(self.chunks)]
        self.tp, self.fp, self.last = int(tp[-1]), int(fp[-1]), (float(fpr[-1]), float(tpr[-1]))

    def metrics(self, max_distance: float, exact: bool) -> dict:
        p, n = self.p, self.n
        if self.tp != p or self.fp != n:
            raise ValueError(f"the groups hold {self.tp} same and {self.fp} different, not {p} and {n}")
        scale = max_distance if (math.isfinite(max_distance) and max_distance > 0) else float("nan")
        (acc, t_acc), (bal, t_bal) = self.best["acc"], self.best["bal"]
        fpr, tpr, thr = (np.concatenate(c) for c in zip(*self.chunks, strict=True))
        return {
            "auc": self.auc_sum / (p * n),
            "auc_error_bound": 0.0 if exact else self.bound_sum / (2.0 * p * n),
            "n_pairs": p + n,
            "n_positive": p,
            "n_negative": n,
            "eer": float(fpr[0]) if self.eer is None else self.eer,
            **at_far(self.tar, n),
            "best_balanced_accuracy": bal,
            "best_balanced_threshold": t_bal,
            "best_balanced_threshold_normalised": t_bal / scale,
            "best_unbalanced_accuracy": acc,
            "best_unbalanced_threshold": t_acc,
            "best_unbalanced_threshold_normalised": t_acc / scale,
            "max_distance": float(max_distance),
            "roc": {"fpr": fpr, "tpr": tpr, "threshold": thr},
        }


def measurable(far: float, n_negative: int) -> bool:
    """Whether `n_negative` different-person pairs can show a false accept rate `far`: f N >= 1, one false accept
    allowed (1e-9 absorbs the rounding of decimal levels, as `Tail.tar_at`'s floor does)."""
    return far * n_negative >= 1.0 - 1e-9


def null_unmeasurable(by_level: dict, n_negative: int) -> dict:
    """`by_level` (a value per FAR level, keys `f"{f:g}"`) with null at the levels that `n_negative`
    different-person pairs cannot show (`measurable`)."""
    return {k: v if measurable(float(k), n_negative) else None for k, v in by_level.items()}


def _far_text(key: str) -> str:
    f = float(key)
    return f"{f:.0e}".replace("e-0", "e-") if f"{f:.0e}".startswith("1e") else f"{f:g}"


def at_far(tar: dict[str, float | None], n_negative: int) -> dict:
    """metrics.json's `tar_at_far`, `fnmr_at_fmr` (1 - TAR) and `smallest_measurable_far` (1/N) from TAR per level
    (keys `f"{f:g}"`), null where `n_negative` pairs cannot show the level (`measurable`), with the note
    `not_measurable` when some level is null."""
    tar = null_unmeasurable(tar, n_negative)
    smallest = 1.0 / n_negative
    out = {
        "tar_at_far": tar,
        "fnmr_at_fmr": {k: None if v is None else 1.0 - v for k, v in tar.items()},
        "smallest_measurable_far": smallest,
    }
    null = [k for k, v in tar.items() if v is None]
    if null:
        levels = _far_text(null[0]) + (f"..{_far_text(null[-1])}" if len(null) > 1 else "")
        out["not_measurable"] = (
            f"TAR at FAR {levels}: not measurable with {n_negative:,} different-person pairs "
            f"(smallest measurable FAR {smallest:.3g})"
        )
    return out


def _thinned(chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    fpr, tpr, thr = (np.concatenate(c) for c in zip(*chunks, strict=True))
    keep = thin_roc(fpr, tpr)
    return fpr[keep], tpr[keep], thr[keep]


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The rate where false accepts equal false rejects, linearly interpolated between ROC points."""
    crossing = _eer_crossing(fpr, tpr)
    return float(fpr[0]) if crossing is None else crossing


def _eer_crossing(fpr: np.ndarray, tpr: np.ndarray) -> float | None:
    """The equal error rate between the first point where false accepts reach false rejects and the point before
    it; None when no point after the first does (the curve goes on), `fpr[0]` when the first does."""
    diff = fpr - (1.0 - tpr)  # rises from -1 to +1
    hits = np.flatnonzero(diff >= 0)
    if not len(hits):
        return None
    k = int(hits[0])
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
