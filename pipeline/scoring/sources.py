"""Row sources of all-pairs scoring: a store's rows in label order, transformed into tile operands
(`ScoreDefinition.augment`), held in memory (`pipeline.scoring.memory.MemoryRows`) or read from the store in
blocks (`pipeline.scoring.rows.StoreRows`). Both answer the same questions, each written once here:

- row statistics (`RowStats`): the row count, NaN/inf rows and (cosine) zero rows refused, the centring mean
  (l2), the largest norm, duplicate rows, same-person pairs, identity groups, the exact tail's size;
- a sample for the bins (`sample_values`), from which `choose_binning` picks the one bin range;
- products of blocks (their `tiles`: the `Product` that the one tile loop, `pipeline.scoring.tiles`, consumes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import Binning
from pipeline.metrics.intervals import identity_groups
from pipeline.metrics.tail import duplicate_ids, start_rank, tail_size
from pipeline.scoring.blockmath import SAMPLE_COLS, SampleRange, products, sample_rows
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.store.layout import Store, bad_rows_error

READ_ROWS_BYTES = 64 << 20  # rows read from the store at a time


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Indices of the rows of `block` that hold NaN or infinite values."""
    ok = np.isfinite(block.sum(axis=1))  # NaN and inf propagate; an overflowing sum is checked exactly
    if not ok.all():
        ok = np.isfinite(block).all(axis=1)
    return np.flatnonzero(~ok)


def refuse_nonfinite(store: Store, store_rows: list[int]) -> None:
    """NaN or infinite rows (by store row) are an error naming them."""
    if store_rows:
        raise bad_rows_error(store, sorted(store_rows))


def read_rows(store: Store, out: np.ndarray | None = None) -> np.ndarray:
    """All rows as float32 into `out` (C-contiguous [n, D] float32; new when None), read in blocks straight from
    the store. NaN or infinite rows are an error that names them."""
    n, d = store.n, store.dim
    out = np.empty((n, d), dtype=np.float32) if out is None else out
    step = max(1, READ_ROWS_BYTES // max(1, d * 4))
    bad: list[int] = []
    for s in range(0, n, step):
        bad.extend((nonfinite_rows(store.read_into(s, min(s + step, n), out)) + s).tolist())
    refuse_nonfinite(store, bad)
    return out


@dataclass
class RowStats:
    """What scoring needs to know of a store's rows, in label order."""

    labels: np.ndarray
    """[N] labels in label order (sorted)."""
    order: np.ndarray | None
    """Sorted position -> store row; None: the store's own order."""
    mean: np.ndarray | None
    """The centring mean (l2), float32; None for cosine."""
    max_norm: float
    """The largest norm of the rows multiplied (centred, l2; 1 for unit rows)."""
    dups: np.ndarray | None
    """Per sorted row, the id of its class of identical rows (-1: none); None when no two rows are identical."""
    offsets: np.ndarray | None
    """Per sorted row, its score offset (float32; cosine only); None: none."""

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def n_pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    @property
    def n_negative(self) -> int:
        """Different-person pairs."""
        return self.n_pairs - self.n_positive

    @cached_property
    def group_sizes(self) -> np.ndarray:
        """Rows of each person, in label order."""
        return np.diff(np.flatnonzero(np.r_[True, np.diff(self.labels) != 0, True]))

    @cached_property
    def n_positive(self) -> int:
        """Same-person pairs."""
        sizes = self.group_sizes
        return int((sizes * (sizes - 1) // 2).sum())

    @property
    def tail_k(self) -> int:
        """Size of the exact tail (`pipeline.metrics.tail.tail_size`)."""
        return tail_size(self.n_pairs, self.n_positive)

    @cached_property
    def groups(self) -> np.ndarray:
        """Each row's identity group (the jackknife's, `pipeline.metrics.intervals.identity_groups`)."""
        return identity_groups(self.labels)

    def store_rows(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self.order is None else self.order[positions]


class RowSource:
    """A store's rows in label order as tile operands (`ScoreDefinition.augment`). A subclass reads and checks
    the rows, computes their float64 squared norms (label order) and the centring mean, and calls `_stats`; it
    gives the sample rows' left operands (`sample_left`) and the right operands of columns (`right_columns`),
    scales its right operands to bins (`scale_to_bins`) and multiplies tiles (`tiles`)."""

    device: Any = "cpu"

    def __init__(self, store: Store, score: ScoreDefinition, order: np.ndarray | None):
        if store.n < 2:
            raise PipelineError(f"{store.path} has {store.n} row(s): scoring needs at least two")
        self.store, self.score, self.n, self.dim = store, score, store.n, store.dim
        self.order, self.offsets = order, score.in_order(order)
        self.stats: RowStats

    def _stats(self, mean: np.ndarray | None, sq: np.ndarray, row: Callable[[int], np.ndarray]) -> RowStats:
        """The statistics from the squared norms `sq` of the rows in label order; `row(i)` reads sorted row i to
        confirm duplicates (identical rows: exact ties in the exact tail)."""
        labels, order = self.store.labels, self.order
        stats = RowStats(labels if order is None else labels[order], order, mean, 0.0, None, self.offsets)
        self.score.refuse_zero_rows(self.store.path, sq, stats.store_rows)
        stats.max_norm = self.score.max_norm(sq)
        stats.dups = duplicate_ids(sq, row)
        return stats

    def sample_left(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def right_columns(self, c0: int, c1: int) -> np.ndarray:
        """Right operands of sorted rows [c0, c1), not scaled to bins."""
        raise NotImplementedError

    def sample_values(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(c0, float32 values) of the sample `rows` against the columns c0.. (NumPy's BLAS in fixed blocks, as
        every source and path computes them)."""
        left = self.sample_left(rows)
        for c0 in range(0, self.n, SAMPLE_COLS):
            yield c0, products(left, self.right_columns(c0, min(c0 + SAMPLE_COLS, self.n)))

    def scale_to_bins(self, binning: Binning) -> None:
        raise NotImplementedError

    def tiles(self, cfg: ScoreConfig, binning: Binning):
        """What multiplies the tiles: `.name` and `.values(t, a2, b2, on_block=None, pending=None)` (a
        `pipeline.scoring.tiles.Product`)."""
        raise NotImplementedError


def choose_binning(source: RowSource, bins: int, seed: int = 0, sample_pairs: int = 1 << 18) -> Binning:
    """Bins over the score range of a sample: random rows against every other row (about `sample_pairs`
    pairs). The range runs between the sample's 10th smallest and 10th largest value, widened by 5% of the span
    on each side and kept inside the provable range (`ScoreDefinition.bin_range`). Rare outliers (duplicate
    images at distance 0) then do not stretch the bins: scores outside count in the edge bins, still correct,
    only coarser there, and `auc_error_bound` accounts for them. Also where the exact tail starts (`near`)."""
    stats, metric = source.stats, source.score.metric
    n = stats.n
    rows = sample_rows(n, seed, sample_pairs)
    keep = start_rank(stats.tail_k, stats.n_pairs, len(rows) * (n - 1))
    rng = SampleRange(rows, n, keep)
    for c0, values in source.sample_values(rows):
        rng.add(values, c0)
    vmin, vmax = rng.extremes()
    lo, hi = source.score.bin_range(vmin, vmax, stats.max_norm)
    return Binning(lo, hi, bins, metric, rng.near(metric))
