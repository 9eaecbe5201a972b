"""The pairs a store lists (`score --pairs`: LFWPairs, View 2 folds): their scores, histogram and 10-fold
accuracy."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import PurePath

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import L2, Binning, Metric
from pipeline.metrics.curve import FAR_LEVELS, exact_counts, exact_metrics
from pipeline.metrics.intervals import BOOTSTRAP_MAX, bootstrap_listed
from pipeline.metrics.roc import HistogramROC
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.sources import read_rows
from pipeline.store.layout import Store

log = logging.getLogger(__name__)


def listed_pairs(store: Store, score: ScoreDefinition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(binned values in float64, same-person flags, folds) of the pairs the store lists; cosines minus the rows'
    score offsets when `score` has them."""
    pairs, pair_labels, folds = store.pairs()
    if len(pairs) == 0:
        raise PipelineError(f"{store.path} lists no pairs")
    if pairs.min() < 0 or pairs.max() >= store.n:
        raise PipelineError(f"{store.path}: /pairs indexes rows outside 0..{store.n - 1}: the store is corrupt")
    x = read_rows(store).astype(np.float64)
    used = np.unique(pairs)
    score.refuse_zero_rows(store.path, np.einsum("ij,ij->i", x[used], x[used]), lambda i: used[i])
    return score.listed_values(x, pairs), pair_labels.astype(bool), folds


def tenfold_accuracy(distance: np.ndarray, positive: np.ndarray, folds: np.ndarray) -> dict:
    """LFW View 2 accuracy: for each fold, the threshold that is best on the other folds, applied to it."""
    accs = []
    for k in np.unique(folds):
        train, test = folds != k, folds == k
        pos, neg, thr = exact_counts(distance[train] ** 2, positive[train], L2)  # ascending distance groups
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


def score_listed_pairs(store: Store, cfg: ScoreConfig,
                       score: ScoreDefinition | None = None) -> tuple[HistogramROC, dict, dict]:  # fmt: skip
    """The listed pairs: exact metrics (every score known), their histogram, and 10-fold accuracy. `score`: the
    store's `ScoreDefinition` under `cfg` (built here when None)."""
    t0 = time.perf_counter()
    score = score or ScoreDefinition.of(store, cfg.metric, cfg.score_norm)
    values, positive, folds = listed_pairs(store, score)
    acc, metrics, extra = listed_metrics(values, positive, score.metric, cfg.bins, cfg.seed)
    acc.arrays = pair_arrays(store, score.metric, values, positive)
    if len(np.unique(folds)) > 1:
        extra.update(tenfold_accuracy(score.metric.to_distance(values), positive, folds))
    extra["seconds"] = time.perf_counter() - t0
    return acc, metrics, extra


def pair_set_id(store: Store) -> str:
    """sha256 of the listed pairs as lines `image<TAB>image<TAB>same`, in order, each image named by the last two
    parts of its path (person/file: the same in every image set and store of the same images; its row where the
    store names no paths): two stores give the same id when they list the same pairs."""
    pairs, labels, _ = store.pairs()
    paths = store.strings("paths")
    names = [str(PurePath(*PurePath(p).parts[-2:])) for p in paths] if len(paths) == store.n else None
    h = hashlib.sha256()
    for (i, j), same in zip(pairs.tolist(), labels.tolist(), strict=True):
        h.update(f"{names[i] if names else i}\t{names[j] if names else j}\t{int(same)}\n".encode())
    return h.hexdigest()


def pair_arrays(store: Store, metric: Metric, values: np.ndarray, positive: np.ndarray) -> dict[str, np.ndarray]:
    """What histogram.npz keeps of the listed pairs (`PAIR_ARRAYS`): each pair's score as a similarity in the score's
    own unit (the cosine after score offsets, or minus the Euclidean distance; float64, in the pairs' order), its
    same-person flag and the pair set's id (`pair_set_id`)."""
    scores = -metric.to_distance(values) if metric.low_is_similar else np.asarray(values, dtype=np.float64)
    return {"pair_scores": scores, "pair_labels": positive.astype(np.int8), "pair_set": np.array(pair_set_id(store))}


def listed_metrics(values: np.ndarray, positive: np.ndarray, metric: Metric, bins: int,
                   seed: int) -> tuple[HistogramROC, dict, dict]:  # fmt: skip
    """Exact metrics and intervals of scores that are all known (listed pairs, score files), and their
    histogram."""
    metrics = exact_metrics(values[positive], values[~positive], metric)
    max_distance = metrics["max_distance"]
    if len(values) <= BOOTSTRAP_MAX:
        metrics.update(bootstrap_listed(values, positive, metric, FAR_LEVELS, seed=seed))
    else:  # 1,000 sorts of this many scores would take hours
        log.warning("%d scores: no bootstrap intervals above %d (auc_ci95 and the others are null)", len(values),
                    BOOTSTRAP_MAX)  # fmt: skip
        metrics.update(auc_ci95=None, eer_ci95=None, tar_at_far_ci95=None)
    lo, hi = float(values.min()), float(values.max())
    acc = HistogramROC(Binning(lo, hi if hi > lo else lo + 1e-6, bins, metric))
    acc.update(values, positive)
    acc.max_distance = max_distance
    return acc, metrics, {"backend": "numpy", "auc_exact": metrics["auc"]}
