"""The pairs a store lists (`score --pairs`: LFWPairs, View 2 folds): their scores, histogram and 10-fold
accuracy."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.intervals import bootstrap_listed
from pipeline.metrics.roc import (
    FAR_LEVELS,
    Binning,
    HistogramROC,
    check_defined,
    exact_counts,
    roc_metrics,
    value_to_distance,
)
from pipeline.scoring.memory import normalise, read_rows
from pipeline.store.layout import Store

if TYPE_CHECKING:
    from pipeline.scoring.stage import ScoreConfig

log = logging.getLogger(__name__)


def listed_pairs(store: Store, metric: str, score_norm: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(binned values in float64, same-person flags, folds) of the pairs the store lists; cosines minus the rows'
    score offsets when the store has them (unless `score_norm` is False)."""
    offsets = store.score_offsets(metric, score_norm)
    pairs, pair_labels, folds = store.pairs()
    if len(pairs) == 0:
        raise PipelineError(f"{store.path} lists no pairs")
    if pairs.min() < 0 or pairs.max() >= store.n:
        raise PipelineError(f"{store.path}: /pairs indexes rows outside 0..{store.n - 1}: the store is corrupt")
    x = read_rows(store).astype(np.float64)
    a, b = x[pairs[:, 0]], x[pairs[:, 1]]
    if metric == "l2":
        values = ((a - b) ** 2).sum(1)
    else:
        normalise(x[np.unique(pairs)], str(store.path))  # zero rows: error
        values = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        if offsets is not None:
            o = offsets.astype(np.float64)
            values -= o[pairs[:, 0]] + o[pairs[:, 1]]
    return values, pair_labels.astype(bool), folds


def tenfold_accuracy(distance: np.ndarray, positive: np.ndarray, folds: np.ndarray) -> dict:
    """LFW View 2 accuracy: for each fold, the threshold that is best on the other folds, applied to it."""
    accs = []
    for k in np.unique(folds):
        train, test = folds != k, folds == k
        pos, neg, thr = exact_counts(distance[train] ** 2, positive[train], "l2")  # ascending distance groups
        correct = np.cumsum(pos) + neg.sum() - np.cumsum(neg)
        best = int(np.argmax(np.r_[neg.sum(), correct]))  # 0 = accept none
        if best == 0:
            t = thr[0] - 1.0
        else:
            t = math.inf if best == len(thr) else 0.5 * (thr[best - 1] + thr[best])
        accs.append(float(np.mean((distance[test] <= t) == positive[test])))
    a = np.array(accs)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {
        "accuracy_10fold_mean": float(a.mean()),
        "accuracy_10fold_std": std,
        "accuracy_10fold_sem": std / math.sqrt(len(a)),
        "accuracy_10fold": accs,
    }


def score_listed_pairs(store: Store, cfg: ScoreConfig) -> tuple[HistogramROC, dict, dict]:
    """The listed pairs: exact metrics (every score known), their histogram, and 10-fold accuracy."""
    t0 = time.perf_counter()
    values, positive, folds = listed_pairs(store, cfg.metric, cfg.score_norm)
    check_defined(int(positive.sum()), int((~positive).sum()))
    distance = value_to_distance(values, cfg.metric)
    max_distance = float(distance.max())
    pos, neg, thr = exact_counts(values, positive, cfg.metric)
    metrics = roc_metrics(pos, neg, thr, max_distance, exact=True)
    metrics.update(bootstrap_listed(values, positive, cfg.metric, FAR_LEVELS, seed=cfg.seed))
    lo, hi = float(values.min()), float(values.max())
    acc = HistogramROC(Binning(lo, hi if hi > lo else lo + 1e-6, cfg.bins, cfg.metric))
    acc.update(values, positive)
    acc.max_distance = max_distance
    extra = {"backend": "numpy", "auc_exact": metrics["auc"], "seconds": time.perf_counter() - t0}
    if len(np.unique(folds)) > 1:
        extra.update(tenfold_accuracy(distance, positive, folds))
    return acc, metrics, extra
