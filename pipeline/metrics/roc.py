"""Streaming ROC: two histograms (same person / different person) over one binning of the scores, and the
metrics derived from them (AUC with its binning error bound, EER, TAR at FAR, best accuracy).

The binned value is what the scoring engine computes cheapest: the squared Euclidean distance for `l2` (small
= similar) and the cosine for `cosine` (large = similar). Bin `k` covers `[lo + k w, lo + (k+1) w)` with
`w = (hi - lo) / bins`; values below `lo` count in the first bin and values above `hi` in the last, so the
binning is monotone for every value and the ROC stays correct, only coarser at the edges.

AUC counts a (positive, negative) pair of pairs as 1 when the positive is more similar, 1/2 on a tie. From the
histograms every such pair is decided exactly unless both fall in the same bin, where it counts 1/2; the true
count there is 0, 1/2 or 1, so `|auc - exact| <= sum_k pos_k * neg_k / (2 P N)`: `auc_error_bound`.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.tail import Tail

if TYPE_CHECKING:
    import torch

METRICS = ("l2", "cosine")
GROUP_ARRAYS = ("group_all", "group_pos", "group_rows")  # histogram.npz names
FAR_LEVELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def value_to_distance(values: np.ndarray, metric: str) -> np.ndarray:
    """Binned value -> distance in the metric's own unit: sqrt of the squared distance (l2), 1 - cosine."""
    values = np.asarray(values, dtype=np.float64)
    return np.sqrt(np.clip(values, 0.0, None)) if metric == "l2" else 1.0 - values


def distance_to_value(distance: float, metric: str) -> float:
    return distance * distance if metric == "l2" else 1.0 - distance


@dataclass(frozen=True)
class Binning:
    """Equal-width bins over [lo, hi] of the binned value (values outside count in the edge bins)."""

    lo: float
    hi: float
    bins: int
    metric: str
    near: float = field(default=math.nan, compare=False)
    """The sample's value where the exact tail starts (`pipeline.metrics.tail.start_rank`); not part of the bins."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {self.metric!r}")
        if self.bins < 2:
            raise ValueError(f"bins must be at least 2, not {self.bins}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"bin range must be finite with hi > lo, not [{self.lo}, {self.hi}]")

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def histogram(self, values: torch.Tensor) -> torch.Tensor:
        """Counts per bin (float tensor, exact up to 2^24 per call for float32 input), edges clamped in."""
        import torch  # here: out-of-core scoring and merge use this module without torch

        if values.numel() == 0:
            return torch.zeros(self.bins, dtype=values.dtype, device=values.device)
        mn, mx = torch.aminmax(values)
        if float(mn) < self.lo or float(mx) > self.hi:
            values = values.clamp(self.lo, self.hi)
        return torch.histc(values, bins=self.bins, min=self.lo, max=self.hi)


def _negatives(neg: np.ndarray) -> np.ndarray:
    if (neg < 0).any():
        raise RuntimeError("same-person counts exceed all-pairs counts in some bin (inconsistent binning)")
    return neg


class HistogramROC:
    """Accumulates same-person (`pos`) and different-person (`neg`) counts per bin.

    `update` takes scores and labels; `add_counts` takes ready counts (the tile engine's fast path); `merge`
    adds another accumulator of the same binning (multi-process scoring); `compute` gives the metrics.
    """

    def __init__(self, binning: Binning, counts: tuple[np.ndarray, np.ndarray] | None = None):
        self.binning = binning
        if counts is None:
            counts = (np.zeros(binning.bins, dtype=np.int64), np.zeros(binning.bins, dtype=np.int64))
        self.pos, self.neg = counts
        """Same-person and different-person counts per bin."""
        self.max_distance: float = float("nan")
        self.tail: Tail | None = None
        """The exact tail of all-pairs scoring (`pipeline.metrics.tail`): exact TAR at low FAR."""
        self.groups: tuple | None = None
        """The jackknife's coarse counts per pair of identity groups (all pairs, same-person pairs) and rows per
        group (`pipeline.metrics.intervals`)."""

    @property
    def n_positive(self) -> int:
        return int(self.pos.sum())

    @property
    def n_negative(self) -> int:
        return int(self.neg.sum())

    def update(self, values, positive) -> None:
        """Add scores (binned values: squared distances for l2, cosines) with their labels (True = same)."""
        import torch

        v = torch.as_tensor(values)
        if not v.is_floating_point():
            v = v.double()
        p = torch.as_tensor(positive, dtype=torch.bool, device=v.device)
        if v.shape != p.shape:
            raise ValueError(f"values {tuple(v.shape)} and labels {tuple(p.shape)} differ in shape")
        v, p = v.reshape(-1), p.reshape(-1)
        hp = self.binning.histogram(v[p])
        hn = self.binning.histogram(v[~p])
        self.pos += hp.double().cpu().numpy().round().astype(np.int64)
        self.neg += hn.double().cpu().numpy().round().astype(np.int64)

    def add_counts(self, all_counts: np.ndarray, pos_counts: np.ndarray) -> None:
        """Add all-pairs and same-person counts of the same pairs; negatives = all - same."""
        all_counts = np.asarray(all_counts, dtype=np.int64)
        pos_counts = np.asarray(pos_counts, dtype=np.int64)
        self.pos += pos_counts
        self.neg += _negatives(all_counts - pos_counts)

    @classmethod
    def from_counts(cls, binning: Binning, all_counts: np.ndarray, pos_counts: np.ndarray) -> HistogramROC:
        """A histogram that takes over two int64 count arrays (`all_counts` becomes the negatives, in place)."""
        return cls(binning, counts=(pos_counts, _negatives(np.subtract(all_counts, pos_counts, out=all_counts))))

    def merge(self, other: HistogramROC) -> HistogramROC:
        """Add `other`'s counts (same binning required); the maximum distance is the larger one."""
        if other.binning != self.binning:
            raise ValueError(f"cannot merge histograms with different binnings: {self.binning} vs {other.binning}")
        self.pos += other.pos
        self.neg += other.neg
        if (self.tail is None) != (other.tail is None):
            raise ValueError("cannot merge histograms with and without an exact tail")
        if self.tail is not None:
            self.tail = self.tail.merge(other.tail).finish()
        if (self.groups is None) != (other.groups is None):
            raise ValueError("cannot merge histograms with and without group counts")
        if self.groups is not None:
            if not np.array_equal(self.groups[2], other.groups[2]):
                raise ValueError("cannot merge histograms of stores whose identity groups differ")
            self.groups = (self.groups[0] + other.groups[0], self.groups[1] + other.groups[1], self.groups[2])
        known = [d for d in (self.max_distance, other.max_distance) if math.isfinite(d)]
        self.max_distance = max(known) if known else float("nan")
        return self

    def ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pos, neg, distance threshold) per bin, from the most similar bin to the least similar."""
        upper = value_to_distance(self.binning.edges()[1:], self.binning.metric)
        if self.binning.metric == "l2":
            return self.pos, self.neg, upper
        lower = value_to_distance(self.binning.edges()[:-1], self.binning.metric)
        return self.pos[::-1], self.neg[::-1], lower[::-1]

    def compute(self) -> dict:
        """Metrics (see `roc_metrics`) from the histograms; `auc_error_bound` bounds the binning error."""
        pos, neg, thr = self.ordered()
        if math.isfinite(self.max_distance):
            thr = thr.copy()
            thr[-1] = max(thr[-1], self.max_distance)
        metrics = roc_metrics(pos, neg, thr, self.max_distance, exact=False)
        if self.tail is not None:
            exact_tail_metrics(metrics, self.tail, self.binning)
        if self.groups is not None:
            from pipeline.metrics.intervals import jackknife_all_pairs

            metrics.update(jackknife_all_pairs(self, metrics))
        return metrics

    def save(self, path: Path | str, **extra) -> None:
        b = self.binning
        arrays = dict(pos=self.pos, neg=self.neg, lo=b.lo, hi=b.hi, bins=b.bins, metric=b.metric,
                      max_distance=self.max_distance)  # fmt: skip
        if self.tail is not None:
            t = self.tail
            arrays.update(tail_k=t.k, tail_neg=t.neg, tail_pos=t.pos, tail_neg_ids=t.neg_ids, tail_pos_ids=t.pos_ids)
        if self.groups is not None:
            arrays.update(zip(GROUP_ARRAYS, self.groups, strict=True))
        np.savez_compressed(path, **arrays, **extra)

    @classmethod
    def load(cls, path: Path | str) -> HistogramROC:
        """Read `save`'s file; a missing, truncated or foreign file is a PipelineError naming it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                acc = cls(Binning(float(z["lo"]), float(z["hi"]), int(z["bins"]), str(z["metric"])))
                acc.pos[:] = z["pos"]
                acc.neg[:] = z["neg"]
                acc.max_distance = float(z["max_distance"])
                if "tail_k" in z.files:
                    acc.tail = Tail(int(z["tail_k"]), acc.binning.metric)
                    acc.tail.add(z["tail_neg"], z["tail_pos"], z["tail_neg_ids"], z["tail_pos_ids"])
                    acc.tail.finish()
                if GROUP_ARRAYS[0] in z.files:
                    acc.groups = tuple(z[k].astype(np.int64) for k in GROUP_ARRAYS)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise PipelineError(f"cannot read histograms {path} (truncated or not written by score?): {e}") from None
        return acc


def exact_counts(values: np.ndarray, positive: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC groups: (pos, neg, distance) per distinct value, most similar first (ties share a group)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    key = values if metric == "l2" else -values  # ascending key = less similar
    uniq, inverse = np.unique(key, return_inverse=True)
    pos = np.bincount(inverse, weights=positive, minlength=len(uniq)).round().astype(np.int64)
    neg = np.bincount(inverse, minlength=len(uniq)).astype(np.int64) - pos
    return pos, neg, value_to_distance(uniq if metric == "l2" else -uniq, metric)


def exact_auc(values: np.ndarray, positive: np.ndarray, metric: str) -> float:
    """AUC by sorting (ties one half): the check for the histogram AUC, O(M log M) time and O(M) memory."""
    pos, neg, _ = exact_counts(values, positive, metric)
    return _auc(pos, neg)[0]


def _auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
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
    auc, bound = _auc(pos, neg)
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


def exact_tail_metrics(metrics: dict, tail: Tail, binning: Binning) -> None:
    """Replace the binned TAR at FAR (and FNMR at FMR) by the exact tail's wherever it reaches; say how far."""
    n_neg, n_pos = metrics["n_negative"], metrics["n_positive"]
    for f in FAR_LEVELS:
        exact = tail.tar_at(f, n_neg, n_pos)
        if exact is not None:
            metrics["tar_at_far"][f"{f:g}"] = exact
            metrics["fnmr_at_fmr"][f"{f:g}"] = 1.0 - exact
    metrics["tail_exact_far"] = tail.exact_far(n_neg)
    last = tail.neg[-1] if len(tail.neg) else np.nan  # the least similar negative held
    raw = binning.lo + float(last) * (binning.hi - binning.lo) / binning.bins
    metrics["tail_exact_down_to"] = float(value_to_distance(np.array([raw]), binning.metric)[0])


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
