"""Streaming ROC: two histograms (same person / different person) over one binning of the scores
(`pipeline.metrics.binning`), and the metrics derived from them (`pipeline.metrics.curve`: AUC with its binning
error bound, EER, TAR at FAR, best accuracy), made exact at low FAR by the exact tail (`pipeline.metrics.tail`)
and given intervals by the jackknife (`pipeline.metrics.intervals`).

Values below the bins' `lo` count in the first bin and values above `hi` in the last, so the binning is monotone
for every value and the ROC stays correct, only coarser at the edges.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import METRICS, Binning, Metric, as_metric, distance_to_value, value_to_distance
from pipeline.metrics.curve import (
    FAR_LEVELS,
    auc_and_bound,
    check_defined,
    equal_error_rate,
    exact_auc,
    exact_counts,
    measurable,
    roc_metrics,
    thin_roc,
)
from pipeline.metrics.intervals import jackknife_all_pairs
from pipeline.metrics.tail import Tail

GROUP_ARRAYS = ("group_all", "group_pos", "group_rows")  # histogram.npz names
PAIR_ARRAYS = ("pair_scores", "pair_labels", "pair_set")
"""histogram.npz names of the listed pairs' own scores (similarities, float64, in the pairs' order), their
same-person flags and the id of the pair set (`pipeline.scoring.listed.pair_arrays`)."""


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
        self.arrays: dict[str, np.ndarray] = {}
        """Saved beside the histograms (`PAIR_ARRAYS`: the listed pairs' per-pair scores)."""

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
        m, edges = self.binning.metric, self.binning.edges()
        # a bin is accepted up to its less similar edge: the upper one (l2), the lower one (cosine)
        bound = m.to_distance(edges[1:] if m.low_is_similar else edges[:-1])
        return m.most_similar_first(self.pos), m.most_similar_first(self.neg), m.most_similar_first(bound)

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
            metrics.update(jackknife_all_pairs(self, metrics))
        return metrics

    def save(self, path: Path | str, **extra) -> None:
        b = self.binning
        arrays = dict(pos=self.pos, neg=self.neg, lo=b.lo, hi=b.hi, bins=b.bins, metric=str(b.metric),
                      max_distance=self.max_distance)  # fmt: skip
        if self.tail is not None:
            t = self.tail
            arrays.update(tail_k=t.k, tail_neg=t.neg, tail_pos=t.pos, tail_neg_ids=t.neg_ids, tail_pos_ids=t.pos_ids)
        if self.groups is not None:
            arrays.update(zip(GROUP_ARRAYS, self.groups, strict=True))
        np.savez_compressed(path, **arrays, **self.arrays, **extra)

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
                acc.arrays = {k: z[k] for k in PAIR_ARRAYS if k in z.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise PipelineError(f"cannot read histograms {path} (truncated or not written by score?): {e}") from None
        return acc


def exact_tail_metrics(metrics: dict, tail: Tail, binning: Binning) -> None:
    """Replace the binned TAR at FAR (and FNMR at FMR) by the exact tail's wherever it reaches; say how far. Levels
    the pairs cannot show stay null (`measurable`)."""
    n_neg, n_pos = metrics["n_negative"], metrics["n_positive"]
    for f in FAR_LEVELS:
        exact = tail.tar_at(f, n_neg, n_pos) if measurable(f, n_neg) else None
        if exact is not None:
            metrics["tar_at_far"][f"{f:g}"] = exact
            metrics["fnmr_at_fmr"][f"{f:g}"] = 1.0 - exact
    metrics["tail_exact_far"] = tail.exact_far(n_neg)
    last = tail.neg[-1] if len(tail.neg) else np.nan  # the least similar negative held
    raw = binning.lo + float(last) * (binning.hi - binning.lo) / binning.bins
    metrics["tail_exact_down_to"] = float(binning.metric.to_distance(np.array([raw]))[0])


__all__ = [
    "FAR_LEVELS",
    "GROUP_ARRAYS",
    "PAIR_ARRAYS",
    "METRICS",
    "Binning",
    "HistogramROC",
    "Metric",
    "as_metric",
    "auc_and_bound",
    "check_defined",
    "distance_to_value",
    "equal_error_rate",
    "exact_auc",
    "exact_counts",
    "exact_tail_metrics",
    "measurable",
    "roc_metrics",
    "thin_roc",
    "value_to_distance",
]
