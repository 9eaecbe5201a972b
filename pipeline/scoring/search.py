"""1:N search on the tile engine's products: probes against a gallery in bounded memory, reduced per probe.

The probes are one operand held in memory (`left`), the gallery another read in chunks of whole canonical blocks
(`gallery.right(a, b)`, rows [a, b) of its operand, possibly from a store on disk). Every product goes through
`pipeline.scoring.blockmath.fixed_matmul` on the canonical blocks of the whole gallery (counted from its first
row), so a gallery span `[A, B)` (a `--rows` part, a torchrun rank) multiplies the blocks it touches, drops the
columns outside, and every score has the same bits as in one run: the parts' reductions (maxima, top scores)
merge into the whole result exactly. Each block is reduced in the product thread that computed it, while it is in
cache, by a reducer: `TopScores` (each probe's R best scores and its best per segment of the gallery) or
`IdentityScores` (each probe's best score per enrolled identity). One loop (`search`), as FAISS's
`exhaustive_search` runs one loop over a block iterator.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import wait

import numpy as np
from tqdm import tqdm

from pipeline.scoring.blockmath import CHUNK, block_spans, fixed_matmul, single_threaded_blas, wait_all

CHUNK_ROWS = 1 << 15  # gallery rows read and multiplied at a time (two chunks in flight)
Block = Callable[..., None]


def gallery_chunks(n: int, span: tuple[int, int], rows: int = CHUNK_ROWS, side: int = CHUNK) -> list[tuple[int, int]]:
    """[g0, g1) chunks of whole canonical blocks of an n-row gallery that cover `span`, at most about `rows` rows
    each (a chunk ends where a canonical block ends, so its blocks are those of the whole gallery)."""
    touched = [s for s in block_spans(n, side) if s[1] > span[0] and s[0] < span[1]]
    chunks: list[tuple[int, int]] = []
    for a, b in touched:
        if chunks and b - chunks[-1][0] <= max(rows, side):
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return chunks


def search(left: np.ndarray, gallery, span: tuple[int, int], reducer, progress: bool = False,
           rows: int = CHUNK_ROWS) -> None:  # fmt: skip
    """Every probe row of `left` against the gallery rows in `span`, each product block handed to
    `reducer.block(g0, lo, hi, i0, i1, j0, j1, values)` (chunk start g0; the span's columns [lo, hi) of the chunk;
    the block's probe rows and chunk columns), in the product threads. `gallery.n` rows; `gallery.right(a, b)` their
    operand rows. Two chunks are in flight: the next is read while the threads multiply the last."""
    chunks = gallery_chunks(gallery.n, span, rows)
    queued: deque[tuple[int, list]] = deque()
    with single_threaded_blas(), tqdm(total=span[1] - span[0], unit="row", unit_scale=True, disable=not progress,
                                       mininterval=1.0, desc="searching gallery") as bar:  # fmt: skip
        try:
            for g0, g1 in chunks:
                right = gallery.right(g0, g1)
                lo, hi = max(span[0], g0) - g0, min(span[1], g1) - g0
                jobs: list = []
                on_block = functools.partial(reducer.block, g0, lo, hi)
                fixed_matmul(left, right, None, side=CHUNK, on_block=on_block, pending=jobs)
                queued.append((hi - lo, jobs))
                while len(queued) > 1:
                    done, jobs = queued.popleft()
                    wait_all(jobs)
                    bar.update(done)
            while queued:
                done, jobs = queued.popleft()
                wait_all(jobs)
                bar.update(done)
        finally:  # on an error, no block job is left running
            wait([f for _, jobs in queued for f in jobs])


def _span_columns(lo: int, hi: int, j0: int, j1: int) -> tuple[int, int]:
    """The block's columns [a, b) (chunk coordinates) inside the span's [lo, hi)."""
    return max(j0, lo), min(j1, hi)


class TopScores:
    """Per probe, its `r` best scores (values: the gallery rows are identities of their own) and its best score in
    each segment of gallery positions (`cuts`: the segments' ends, increasing, the last the gallery's end), kept
    per product thread and merged by `finish`. A block's values enter only for the probes whose block maximum
    beats their r-th best so far (most blocks of a long search hold none)."""

    def __init__(self, n_probes: int, r: int, cuts: list[int]):
        self.n, self.r, self.cuts = n_probes, r, list(cuts)
        self._states: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        st = self._states.get(threading.get_ident())
        if st is None:
            st = self._states[threading.get_ident()] = (
                np.full((self.n, self.r), -np.inf, np.float32),  # the r best (unordered)
                np.full(self.n, -np.inf, np.float32),  # the r-th best
                np.full((self.n, len(self.cuts)), -np.inf, np.float32),  # best per segment
            )
        return st

    def block(self, g0: int, lo: int, hi: int, i0: int, i1: int, j0: int, j1: int, v: np.ndarray) -> None:
        a, b = _span_columns(lo, hi, j0, j1)
        if b <= a:
            return
        vals, thr, seg = self._state()
        blk = v[:, a - j0 : b - j0]
        start, stop = g0 + a, g0 + b  # gallery positions
        s = bisect.bisect_right(self.cuts, start)
        rowmax = None
        while start < stop:
            end = min(self.cuts[s], stop)
            m = blk[:, start - g0 - a : end - g0 - a].max(axis=1)
            np.maximum(seg[i0:i1, s], m, out=seg[i0:i1, s])
            rowmax = m if rowmax is None else np.maximum(rowmax, m)
            start, s = end, s + 1
        rows = np.flatnonzero(rowmax > thr[i0:i1])
        if rows.size:
            _insert(vals, thr, i0 + rows, blk[rows])

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(best scores [n, r] sorted best first, best per segment [n, segments]) over every thread."""
        states = list(self._states.values()) or [self._state()]
        vals = top_columns(np.concatenate([s[0] for s in states], axis=1), self.r)
        seg = functools.reduce(np.maximum, [s[2] for s in states])
        return vals, seg


def _insert(vals: np.ndarray, thr: np.ndarray, rows: np.ndarray, sub: np.ndarray) -> None:
    """The values of `sub` (one row per probe in `rows`) above each probe's r-th best into its r best."""
    above = sub > thr[rows][:, None]
    count = above.sum(axis=1)
    width = int(count.max())
    r_at, c_at = np.nonzero(above)
    first = np.cumsum(count) - count
    cand = np.full((len(rows), width), -np.inf, np.float32)
    cand[r_at, np.arange(len(r_at)) - first[r_at]] = sub[r_at, c_at]
    both = np.concatenate([vals[rows], cand], axis=1)
    best = np.partition(both, width, axis=1)[:, width:]
    vals[rows] = best
    thr[rows] = best.min(axis=1)


def top_columns(values: np.ndarray, r: int, ids: np.ndarray | None = None):
    """Each row's r largest values sorted largest first (padded with -inf), with their `ids` when given."""
    n, w = values.shape
    if w < r:
        values = np.concatenate([values, np.full((n, r - w), -np.inf, values.dtype)], axis=1)
        if ids is not None:
            ids = np.concatenate([ids, np.full((n, r - w), -1, ids.dtype)], axis=1)
        w = r
    at = np.argpartition(-values, r - 1, axis=1)[:, :r] if w > r else np.broadcast_to(np.arange(w), (n, w))
    v = np.take_along_axis(values, at, axis=1)
    order = np.argsort(-v, axis=1, kind="stable")
    v = np.take_along_axis(v, order, axis=1)
    if ids is None:
        return v
    return v, np.take_along_axis(np.take_along_axis(ids, at, axis=1), order, axis=1)


class IdentityScores:
    """Per probe, its best score for each identity of a gallery whose columns are sorted by identity (`ids`:
    column -> identity index), in one [probes, identities] array. Threads that reduce blocks of the same probe
    rows take turns (a lock per row block)."""

    def __init__(self, n_probes: int, ids: np.ndarray, n_ids: int):
        self.ids = ids
        self.best = np.full((n_probes, n_ids), -np.inf, np.float32)
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def block(self, g0: int, lo: int, hi: int, i0: int, i1: int, j0: int, j1: int, v: np.ndarray) -> None:
        a, b = _span_columns(lo, hi, j0, j1)
        if b <= a:
            return
        cols = self.ids[g0 + a : g0 + b]
        starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
        reduced = np.maximum.reduceat(v[:, a - j0 : b - j0], starts, axis=1)
        idx = cols[starts]
        with self._lock:
            lock = self._locks.setdefault(i0, threading.Lock())
        with lock:
            self.best[i0:i1, idx] = np.maximum(self.best[i0:i1, idx], reduced)
