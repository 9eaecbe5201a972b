"""The metrics of a score file (`score --scores`), from its blocks (`pipeline.scoring.scorefiles.read_blocks`),
without torch.

- Up to `EXACT_MAX` scores every score is held (10 bytes each: value, flag, group pair) and the metrics are exact,
  as for a store's listed pairs (`pipeline.metrics.curve.exact_metrics`, sorted genuine and impostor arrays).
- Beyond, the file is read twice, as all pairs are scored: once for the range of the bins, once into the histogram
  and the exact tail (`HistogramROC`, `Tail`): AUC within its binning bound, TAR at low FAR exact.

Intervals: where the file names identities, the delete-a-group jackknife of all pairs (scores sharing a person are
not independent): each identity hashed into one of `GROUPS` groups, coarse counts per pair of groups and the tail's
group pairs (`pipeline.metrics.intervals.jackknife_all_pairs`); otherwise the pair bootstrap up to
`BOOTSTRAP_MAX` scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import COSINE, Binning
from pipeline.metrics.curve import FAR_LEVELS, check_defined, exact_metrics
from pipeline.metrics.intervals import BOOTSTRAP_MAX, COARSE, GROUPS, bootstrap_listed, jackknife_all_pairs
from pipeline.metrics.roc import HistogramROC
from pipeline.metrics.tail import Tail, tail_size
from pipeline.scoring.counting import BinCounts
from pipeline.scoring.scorefiles import ScoreBlock

log = logging.getLogger(__name__)
EXACT_MAX = 50_000_000  # scores held for exact metrics (500 MB); beyond, the histogram and exact tail
FILE_TAIL = 1 << 18  # negatives the exact tail holds at least (1.5 MB)
NO_INTERVALS = {"auc_ci95": None, "eer_ci95": None, "tar_at_far_ci95": None}


class FileCounts:
    """The histogram, exact tail and (with identities) the jackknife's group counts of a file's scores, block by
    block, as the all-pairs engine keeps them: bin coordinates in float32, counted by `BinCounts`."""

    def __init__(self, binning: Binning, n_pairs: int, n_positive: int, grouped: bool):
        n_ids = GROUPS * GROUPS if grouped else 0
        self.binning, self.grouped = binning, grouped
        self.all, self.pos = BinCounts(binning.bins, n_ids, COARSE), BinCounts(binning.bins, n_ids, COARSE)
        # every negative up to FILE_TAIL (a file's scores are few next to all pairs'): the jackknife's TAR at every
        # FAR level up to FILE_TAIL / negatives, and at all of them for files of that many negatives
        self.tail = Tail(max(tail_size(n_pairs, n_positive), min(FILE_TAIL, n_pairs - n_positive)), binning.metric)
        self.group_scores = np.zeros(GROUPS, dtype=np.int64)

    def add(self, blk: ScoreBlock) -> None:
        b = self.binning
        c = ((blk.values - b.lo) * b.scale).astype(np.float32)
        same = blk.same
        ids = blk.group_pair if self.grouped else None
        self.all.add(c, ids)
        self.pos.add(c[same], None if ids is None else ids[same])
        ids = np.zeros(len(c), dtype=np.int16) if ids is None else ids.astype(np.int16)
        neg, neg_ids, pos, pos_ids = c[~same], ids[~same], c[same], ids[same]
        kn, kp = self.tail.candidates(neg), self.tail.candidates(pos)
        self.tail.add(neg[kn], pos[kp], neg_ids[kn], pos_ids[kp])
        if self.grouped:
            a, g = np.divmod(blk.group_pair, GROUPS)
            self.group_scores += np.bincount(a, minlength=GROUPS) + np.bincount(g, minlength=GROUPS)

    def histogram(self, max_distance: float) -> HistogramROC:
        acc = HistogramROC.from_counts(self.binning, self.all.flush(), self.pos.flush())
        acc.max_distance = max_distance
        acc.tail = self.tail.finish()
        if self.grouped:
            acc.groups = (self.all.group_counts, self.pos.group_counts, self.group_scores)
        return acc


def file_metrics(read: Callable[[], Iterator[ScoreBlock]], name: str, bins: int, seed: int,
                 exact_max: int = EXACT_MAX) -> tuple[HistogramROC, dict, dict]:  # fmt: skip
    """(histogram, metrics, extra) of the scores `read()` yields (from the file `name`), exact up to `exact_max`
    scores."""
    held: list[ScoreBlock] | None = []
    n = 0
    for blk in read():
        held.append(blk)
        n += len(blk.values)
        if n > exact_max:
            held = None  # too many to hold: two streaming passes
            break
    if held is None:
        return _streamed(read, bins)
    if not n:
        raise PipelineError(f"{name} holds no scores")
    return _exact(held, bins, seed)


def _binning(lo: float, hi: float, bins: int) -> Binning:
    return Binning(lo, hi if hi > lo else lo + 1e-6, bins, COSINE)


def _counts(blocks: list[ScoreBlock] | Iterator[ScoreBlock], binning: Binning, n: int, n_pos: int,
            grouped: bool) -> FileCounts:  # fmt: skip
    counts = FileCounts(binning, n, n_pos, grouped)
    for blk in blocks:
        counts.add(blk)
    return counts


def _exact(held: list[ScoreBlock], bins: int, seed: int) -> tuple[HistogramROC, dict, dict]:
    n_pos = sum(int(b.same.sum()) for b in held)
    n = sum(len(b.values) for b in held)
    check_defined(n_pos, n - n_pos)
    grouped = held[0].group_pair is not None
    lo, hi = min(float(b.values.min()) for b in held), max(float(b.values.max()) for b in held)
    counts = _counts(held, _binning(lo, hi, bins), n, n_pos, grouped)
    genuine, impostor = _split(held, n_pos, n)
    intervals = NO_INTERVALS
    if not grouped and n <= BOOTSTRAP_MAX:
        values, same = np.concatenate([genuine, impostor]), np.arange(n) < n_pos
        intervals = bootstrap_listed(values, same, COSINE, FAR_LEVELS, seed=seed)
    metrics = exact_metrics(genuine, impostor, COSINE)
    acc = counts.histogram(metrics["max_distance"])
    if grouped:
        intervals = jackknife_all_pairs(acc, metrics)
        intervals["ci_method"] = (
            f"delete-a-group jackknife over {GROUPS} groups of identities (each identity's name hashed), "
            f"{COARSE} coarse bins for AUC and EER, the exact tail for TAR at FAR"
        )
    elif n > BOOTSTRAP_MAX:
        log.warning("%d scores without identities: no intervals above %d", n, BOOTSTRAP_MAX)
    metrics.update(intervals)
    return acc, metrics, {"backend": "numpy", "auc_exact": metrics["auc"], "scores_held": True}


def _split(held: list[ScoreBlock], n_pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The genuine and the impostor scores, each block let go once copied (the scores are held once)."""
    genuine, impostor = np.empty(n_pos), np.empty(n - n_pos)
    g = i = 0
    held.reverse()
    while held:
        b = held.pop()
        v = b.values[b.same]
        genuine[g : g + len(v)] = v
        g += len(v)
        v = b.values[~b.same]
        impostor[i : i + len(v)] = v
        i += len(v)
    return genuine, impostor


def _streamed(read: Callable[[], Iterator[ScoreBlock]], bins: int) -> tuple[HistogramROC, dict, dict]:
    lo, hi, n, n_pos, grouped = np.inf, -np.inf, 0, 0, False
    for blk in read():  # the first pass: the range of the bins and the counts the tail's size depends on
        lo, hi = min(lo, float(blk.values.min())), max(hi, float(blk.values.max()))
        n, n_pos, grouped = n + len(blk.values), n_pos + int(blk.same.sum()), blk.group_pair is not None
    check_defined(n_pos, n - n_pos)
    log.info("%d scores: more than are held, so the histogram and exact tail of a second pass", n)
    acc = _counts(read(), _binning(lo, hi, bins), n, n_pos, grouped).histogram(float(COSINE.to_distance(lo)))
    metrics = acc.compute()
    if not grouped:
        metrics.update({k: v for k, v in NO_INTERVALS.items() if k not in metrics})
    return acc, metrics, {"backend": "numpy", "scores_held": False}
