"""Rows into search operands (`pipeline.scoring.search`): the probes' operand, each trial's enrolled gallery
(its images sorted by identity, or one mean template per identity) and the distractors read from their stores in
chunks. Scores are `score`'s (`ScoreDefinition.augment`: cosine minus the score offsets, or the squared distance
of rows centred on the probe store's mean); the gallery operands of l2 are negated, so that a larger value is
always a more similar one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.identify.protocol import Trial
from pipeline.metrics.binning import as_metric
from pipeline.scoring.blockmath import STAT_ROWS, blocked_mean
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.sources import nonfinite_rows, read_rows, refuse_nonfinite
from pipeline.store.layout import Store, bad_rows_error


class Operands:
    """The transform of one search: the metric, the centring mean (l2) and whether operands carry score offsets
    (cosine, when any store has them; a store without offsets then has offsets 0)."""

    def __init__(self, metric: str, mean: np.ndarray | None, dim: int, offsets: bool):
        self.score = ScoreDefinition(as_metric(metric), np.zeros(1, np.float32) if offsets else None)
        self.mean, self.dim, self.offsets = mean, dim, offsets
        self.width = self.score.width(dim)
        self.negate = self.score.euclidean

    def _augment(self, x: np.ndarray, offsets: np.ndarray | None, path: Path | str,
                 rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        left = np.empty((len(x), self.width), dtype=np.float32)
        right = np.empty_like(left)
        if self.offsets and offsets is None:
            offsets = np.zeros(len(x), dtype=np.float32)
        sq = self.score.augment(x, self.mean, left, right, offsets if self.offsets else None)
        self.score.refuse_zero_rows(path, sq, lambda k: rows[k])
        return left, right

    def probes(self, x: np.ndarray, offsets: np.ndarray | None, path: Path | str, rows: np.ndarray) -> np.ndarray:
        """The probes' operand (`rows`: their store rows, for errors)."""
        return self._augment(x, offsets, path, rows)[0]

    def gallery(self, x: np.ndarray, offsets: np.ndarray | None, path: Path | str, rows: np.ndarray) -> np.ndarray:
        """The gallery's operand: `probes @ gallery.T` is the similarity (cosine minus offsets, or minus the squared
        distance)."""
        right = self._augment(x, offsets, path, rows)[1]
        if self.negate:
            np.negative(right, out=right)
        return right


def store_operands(
    store: Store, metric: str, score_norm: bool, distractors: list[Store]
) -> tuple[Operands, np.ndarray]:
    """The probe store's rows in memory (NaN/inf refused) and the operands' transform for it and the
    distractors."""
    x = read_rows(store)
    mean = None
    if as_metric(metric).low_is_similar:
        mean = blocked_mean((x[s : s + STAT_ROWS] for s in range(0, len(x), STAT_ROWS)), len(x))
    offsets = metric == "cosine" and score_norm and any(s.offsets is not None for s in [store, *distractors])
    return Operands(metric, mean, store.dim, offsets), x


def own_offsets(store: Store, metric: str, score_norm: bool) -> np.ndarray | None:
    """The store's score offsets where they count (`Store.score_offsets`: an error with l2 unless
    `--no-score-norm`)."""
    return store.score_offsets(metric, score_norm)


@dataclass
class MemoryGallery:
    """A gallery operand held in memory."""

    operand: np.ndarray

    @property
    def n(self) -> int:
        return len(self.operand)

    def right(self, a: int, b: int) -> np.ndarray:
        return self.operand[a:b]


@dataclass
class Enrolled:
    """One trial's enrolled gallery: its operand, each column's identity (0..people-1, increasing) and each
    identity's label."""

    gallery: MemoryGallery
    ids: np.ndarray
    people: np.ndarray


def enrolled(x: np.ndarray, labels: np.ndarray, offsets: np.ndarray | None, trial: Trial, template: str,
             ops: Operands, path: Path | str) -> Enrolled:  # fmt: skip
    """The trial's gallery images sorted by identity then store row (`best`), or one template per identity, the
    mean of its unit-length images, whose offset is the mean of theirs (`mean`)."""
    rows = trial.gallery[np.lexsort((trial.gallery, labels[trial.gallery]))]
    people, ids = np.unique(labels[rows], return_inverse=True)
    if template == "mean":
        unit = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
        starts = np.flatnonzero(np.r_[True, np.diff(ids) != 0])
        sizes = np.diff(np.r_[starts, len(rows)])
        templates = (np.add.reduceat(unit.astype(np.float64), starts) / sizes[:, None]).astype(np.float32)
        o = None if offsets is None else (np.add.reduceat(offsets[rows].astype(np.float64), starts) / sizes)
        right = ops.gallery(templates, None if o is None else o.astype(np.float32), path, rows[starts])
        return Enrolled(MemoryGallery(right), np.arange(len(people)), people)
    right = ops.gallery(x[rows], None if offsets is None else offsets[rows], path, rows)
    return Enrolled(MemoryGallery(right), ids, people)


class StoreGallery:
    """Distractor stores, one after the other, read in chunks (out of core); each row an identity of its own."""

    def __init__(self, stores: list[Store], ops: Operands, metric: str, score_norm: bool):
        for s in stores:
            if s.dim != ops.dim:
                raise PipelineError(f"distractor store {s.path} has {s.dim}-d rows, the probes {ops.dim}-d: embed "
                                    f"both with the same network and layer")  # fmt: skip
        self.stores, self.ops = stores, ops
        self.offsets = [own_offsets(s, metric, score_norm) for s in stores]
        self.starts = np.cumsum([0] + [s.n for s in stores])
        self.n = int(self.starts[-1])

    def right(self, a: int, b: int) -> np.ndarray:
        """The operand of distractor rows [a, b) (across stores)."""
        pieces = []
        for k, s in enumerate(self.stores):
            lo, hi = max(a, self.starts[k]) - self.starts[k], min(b, self.starts[k + 1]) - self.starts[k]
            if hi <= lo:
                continue
            x = s.rows(int(lo), int(hi))
            bad = nonfinite_rows(x)
            if len(bad):
                raise bad_rows_error(s, (bad + lo).tolist())
            o = None if self.offsets[k] is None else self.offsets[k][lo:hi]
            pieces.append(self.ops.gallery(x, o, s.path, np.arange(lo, hi)))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


__all__ = ["Operands", "store_operands", "enrolled", "Enrolled", "MemoryGallery", "StoreGallery", "refuse_nonfinite"]
