"""Rows read from the store in blocks (`StoreRows`, a row source of `pipeline.scoring.sources`), without torch:
out-of-core all-pairs scoring of a span of rows (`score --all-pairs --rows A:B`, or a store larger than memory).

The rows are those the in-memory `score` multiplies, in the same order (label order: a store in another row
order is first copied in label order to a temporary file, `pipeline.scoring.sorted_rows`), with the same
statistics, bins, row transforms and products (`pipeline.scoring.blockmath`): a whole run, and the parts of any
split of [0, N) added up by `cli.py merge`, give the in-memory results bit for bit. Every part draws the
bin-range sample from the whole store with the same seed, so all parts share their bins.

Memory: two row blocks and a few bytes of labels per row, whatever the size of the store (docs/design.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.metrics.binning import Binning
from pipeline.scoring.blockmath import STAT_ROWS, Tile, blocked_mean, chunk_side, fixed_matmul, scale_right
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.sorted_rows import LabelOrder, label_order
from pipeline.scoring.sources import RowSource, nonfinite_rows, refuse_nonfinite
from pipeline.store.layout import Store


def larger_than_memory(store: Path) -> bool:
    """True when the rows in-memory scoring would hold (2 x N x (D+2) float32) exceed half the free memory:
    such stores are scored block by block, every row as one span. False when the store cannot be read (the
    scoring then says what is wrong with it)."""
    import h5py

    try:
        with h5py.File(store, "r") as f:
            n, d = f["embeddings"].shape
    except (OSError, KeyError, ValueError):
        return False
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 8 * n * (d + 2) > free / 2


class StoreRows(RowSource):
    """The store's rows in label order, read and transformed block by block on demand; a context manager (it
    releases the temporary sorted copy). The statistics stream the rows once for the mean and the NaN/inf check
    and once for the squared norms."""

    def __init__(self, store: Store, score: ScoreDefinition, progress: bool = True):
        order = label_order(store.labels)
        super().__init__(store, score, order)
        self.src = LabelOrder(store, progress=progress, order=order)
        self.binning: Binning | None = None
        try:
            self.mean = self._mean()
            sq = np.concatenate([self.operands(s, min(s + STAT_ROWS, self.n))[2] for s in range(0, self.n, STAT_ROWS)])
            self.stats = self._stats(self.mean, sq, lambda i: self.src.rows(i, i + 1)[0])
        except BaseException:
            self.close()
            raise

    def _mean(self) -> np.ndarray | None:
        """The centring mean (l2) of the rows streamed in label order, whose NaN/inf rows are an error."""
        bad: list[int] = []

        def blocks():
            for s in range(0, self.n, STAT_ROWS):
                blk = self.src.rows(s, min(s + STAT_ROWS, self.n))
                bad.extend((nonfinite_rows(blk) + s).tolist())
                yield blk

        mean = blocked_mean(blocks(), self.n) if self.score.euclidean else None
        if mean is None:
            for _ in blocks():
                pass
        refuse_nonfinite(self.store, self.src.store_rows(bad).tolist())
        return mean

    def operands(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left, right, squared norms) of sorted rows [a, b), transformed as `MemoryRows` transforms them, in
        `STAT_ROWS`-aligned pieces; `right` scaled to bins once a binning is set."""
        left = np.empty((b - a, self.score.width(self.dim)), dtype=np.float32)
        right = np.empty_like(left)
        sq = np.empty(b - a, dtype=np.float64)
        for s in range(a, b, STAT_ROWS):
            e = min(b, (s // STAT_ROWS + 1) * STAT_ROWS)
            o = None if self.offsets is None else self.offsets[s:e]
            sq[s - a : e - a] = self.score.augment(self.src.rows(s, e), self.mean, left[s - a : e - a],
                                                   right[s - a : e - a], o)  # fmt: skip
        if self.binning is not None:
            scale_right(right, self.binning.lo, self.binning.hi, self.binning.bins)
        return left, right, sq

    def sample_left(self, rows: np.ndarray) -> np.ndarray:
        left = np.empty((len(rows), self.score.width(self.dim)), dtype=np.float32)
        o = None if self.offsets is None else self.offsets[rows]
        self.score.augment(self.src.take(rows), self.mean, left, np.empty_like(left), o)
        return left

    def right_columns(self, c0: int, c1: int) -> np.ndarray:
        return self.operands(c0, c1)[1]

    def scale_to_bins(self, binning: Binning) -> None:
        self.binning = binning

    def tiles(self, cfg: ScoreConfig, binning: Binning) -> BlockTiles:
        return BlockTiles(self, cfg.block)

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> StoreRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BlockTiles:
    """Tile products from row blocks `[k*T, (k+1)*T)` of a `StoreRows` (T the tile side; the last two blocks
    kept), block by block (`fixed_matmul`)."""

    name = "numpy-out-of-core"

    def __init__(self, rows: StoreRows, block: int):
        self.rows, self.side, self.unit = rows, min(block, rows.n), chunk_side(block)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(min(self.cache))
            self.cache[k] = self.rows.operands(k * self.side, min((k + 1) * self.side, self.rows.n))[:2]
        return self.cache[k]

    def values(self, t: Tile, a2: int, b2: int, on_block, pending=None) -> None:
        """Rows [a2, b2) of tile `t` against its columns, handed to `on_block` block by block."""
        side = self.side
        kr, kc = t.r0 // side, t.c0 // side
        left = self.block(kr)[0][a2 - kr * side : b2 - kr * side]
        right = self.block(kc)[1][t.c0 - kc * side : t.c1 - kc * side]
        return fixed_matmul(left, right, None, side=self.unit, below=a2 - t.r0 if t.diagonal else None,
                            on_block=on_block, pending=pending)  # fmt: skip
