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
import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import wait

import numpy as np
from tqdm import tqdm

from pipeline.scoring.blockmath import CHUNK, block_spans, fixed_matmul, single_threaded_blas, wait_all

CHUNK_ROWS = 1 << 15  # gallery rows read and multiplied at a time (two chunks in flight)
STRIP = 8  # probe blocks a product job computes side by side before its reducer takes them (fewer hand-overs)
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


def search(left, gallery, span: tuple[int, int], reducer, progress: bool = False, rows: int = CHUNK_ROWS) -> None:
    """Every probe row of `left` against the gallery rows in `span`. Each product block, gallery rows against
    probes (so that a probe's maxima over gallery rows are column-wise, vectorised maxima), goes to
    `reducer.block(g0, lo, hi, i0, i1, j0, j1, values)` in the product thread that computed it: chunk start g0,
    the span's rows [lo, hi) of the chunk, the block's gallery rows [i0, i1) (chunk coordinates) and probes
    [j0, j1). `gallery.n` rows; `gallery.right(a, b)` their operand rows. Two chunks are in flight: the next is
    read while the threads multiply the last. With `left` a torch tensor (the GPU's branch), each chunk's span
    rows are multiplied by one product on its device and go whole to `reducer.tensor(g0 + lo, values)`."""
    if not isinstance(left, np.ndarray):
        rows = max(CHUNK, min(rows, (1 << 28) // max(1, left.shape[0])))  # a product of at most 1 GiB
    chunks = gallery_chunks(gallery.n, span, rows)
    queued: deque[tuple[int, list]] = deque()
    with single_threaded_blas(), tqdm(total=span[1] - span[0], unit="row", unit_scale=True, disable=not progress,
                                       mininterval=1.0, desc="searching gallery") as bar:  # fmt: skip
        try:
            for g0, g1 in chunks:
                right = gallery.right(g0, g1)
                lo, hi = max(span[0], g0) - g0, min(span[1], g1) - g0
                if not isinstance(left, np.ndarray):
                    _tensor_chunk(left, right[lo:hi], g0 + lo, reducer)
                    bar.update(hi - lo)
                    continue
                jobs: list = []
                on_block = functools.partial(reducer.block, g0, lo, hi)
                fixed_matmul(right, left, None, side=CHUNK, on_block=on_block, pending=jobs, strip=STRIP)
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


def _tensor_chunk(left, right: np.ndarray, start: int, reducer) -> None:
    """The GPU's branch: gallery rows [start, start + len(right)) against every probe, one product."""
    import torch

    r = torch.from_numpy(np.ascontiguousarray(right)).to(left.device, non_blocking=True)
    reducer.tensor(start, r @ left.T)


def _span_rows(lo: int, hi: int, i0: int, i1: int) -> tuple[int, int]:
    """The block's gallery rows [a, b) (chunk coordinates) inside the span's [lo, hi)."""
    return max(i0, lo), min(i1, hi)


SPARE = 64  # candidates a probe holds beside its r best before they are folded in
GROUP = 16  # gallery rows whose maximum is taken first: only groups above a probe's bound are looked into


class _Best:
    """One product thread's running best scores: per probe its r best as of its last fold (`vals[:, :r]`,
    unordered), up to `SPARE` candidates since (`vals[:, r:]`, -inf where empty), and the r-th best at the last
    fold (`thr`: a lower bound of the final one, so a value not above it never enters). Appending a candidate
    costs a store; the r best are sorted out (a partition) only when a probe's spare places run out."""

    def __init__(self, n: int, r: int, segments: int, floor: np.ndarray | None):
        self.r = r
        self.vals = np.full((n, r + SPARE), -np.inf, np.float32)
        self.fill = np.zeros(n, np.int64)
        self.thr = np.full(n, -np.inf, np.float32)
        self.seg = np.full((n, segments), -np.inf, np.float32)  # best per segment
        # v > below_floor <=> v >= floor
        self.below_floor = None if floor is None else np.nextafter(floor.astype(np.float32), np.float32(-np.inf))

    def first(self, j0: int, blk: np.ndarray) -> None:
        """The first block of probes j0.. (nothing kept yet; at least r rows): each probe's r best of it."""
        best = np.partition(blk, len(blk) - self.r, axis=0)[-self.r :].T
        self.vals[j0 : j0 + best.shape[0], : self.r] = best
        self._bound(np.arange(j0, j0 + best.shape[0]), best)

    def add(self, probes: np.ndarray, values: np.ndarray) -> None:
        """Candidates (each a probe and a value above its bound), sorted by probe, a probe any number of times."""
        p, v = probes, values
        starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
        count = np.diff(np.r_[starts, len(p)])
        u, rank = p[starts], np.arange(len(p)) - np.repeat(starts, count)
        full = self.fill[u] + count > SPARE
        if full.any():  # fold these probes' spare places and new values into their r best
            sel = np.repeat(full, count)
            extra = np.full((int(full.sum()), int(count[full].max())), -np.inf, np.float32)
            extra[np.repeat(np.arange(len(extra)), count[full]), rank[sel]] = v[sel]
            self._fold(u[full], extra)
            p, v, rank, u, count = p[~sel], v[~sel], rank[~sel], u[~full], count[~full]
        self.vals[p, self.r + self.fill[p] + rank] = v
        self.fill[u] += count

    def _fold(self, rows: np.ndarray, extra: np.ndarray | None = None) -> None:
        both = self.vals[rows] if extra is None else np.concatenate([self.vals[rows], extra], axis=1)
        best = np.partition(both, both.shape[1] - self.r, axis=1)[:, -self.r :]
        self.vals[rows, : self.r] = best
        self.vals[rows, self.r :] = -np.inf
        self.fill[rows] = 0
        self._bound(rows, best)

    def _bound(self, rows: np.ndarray, best: np.ndarray) -> None:
        """A value enters only above the probe's r-th best, or, where that lies below the probe's floor (no value
        under it counts), only at or above the floor, or, for the probe's best, above its best."""
        rth = best.min(axis=1)
        if self.below_floor is not None:
            rth = np.minimum(best.max(axis=1), np.maximum(self.below_floor[rows], rth))
        self.thr[rows] = rth

    def best(self) -> np.ndarray:
        """[n, r]: every probe's r best (unordered)."""
        self._fold(np.arange(len(self.vals)))
        return self.vals[:, : self.r]


class TopScores:
    """Per probe, its `r` best scores (values: the gallery rows are identities of their own) and its best score in
    each segment of gallery positions (`cuts`: the segments' ends, increasing, the last the gallery's end), kept
    per product thread (`_Best`) and merged by `finish`. Of a block, the maxima of groups of `GROUP` gallery rows
    come first; only groups whose maximum beats a probe's bound are looked into (late in a long search, few)."""

    def __init__(self, n_probes: int, r: int, cuts: list[int], floor: np.ndarray | None = None):
        self.n, self.r, self.cuts, self.floor = n_probes, r, list(cuts), floor
        self._states: dict[int, _Best] = {}
        self._device = None  # the GPU's branch: (r best [r, n], best per segment [segments, n]) on the device

    def _state(self) -> _Best:
        st = self._states.get(threading.get_ident())
        if st is None:
            st = self._states[threading.get_ident()] = _Best(self.n, self.r, len(self.cuts), self.floor)
        return st

    def block(self, g0: int, lo: int, hi: int, i0: int, i1: int, j0: int, j1: int, v: np.ndarray) -> None:
        a, b = _span_rows(lo, hi, i0, i1)
        if b <= a:
            return
        st = self._state()
        blk = v[a - i0 : b - i0]  # [gallery rows, probes]
        n, whole = len(blk), len(blk) // GROUP * GROUP
        groups = blk[:whole].reshape(-1, GROUP, blk.shape[1]).max(axis=1)
        if whole < n:
            groups = np.concatenate([groups, blk[whole:].max(axis=0, keepdims=True)])
        top = self._segments(st, g0 + a, g0 + b, blk, groups, j0, j1)
        thr = st.thr[j0:j1]
        if n >= self.r and thr[0] == -np.inf and (thr == -np.inf).all():
            st.first(j0, blk)
            return
        hot = np.flatnonzero(top > thr)  # probes with a value above their bound
        if not hot.size:
            return
        pj, gi = np.nonzero((groups[:, hot] > thr[hot]).T)  # by probe
        pj = hot[pj]
        at = gi[:, None] * GROUP + np.arange(GROUP)
        vals = np.take(blk.reshape(-1), np.minimum(at, n - 1) * blk.shape[1] + pj[:, None])
        if whole < n:
            vals[at >= n] = -np.inf  # the short last group
        keep = vals > thr[pj][:, None]
        st.add(np.broadcast_to((j0 + pj)[:, None], vals.shape)[keep], vals[keep])

    def _segments(self, st: _Best, start: int, stop: int, blk: np.ndarray, groups: np.ndarray, j0: int,
                  j1: int) -> np.ndarray:  # fmt: skip
        """Each probe's best in the segments of gallery positions [start, stop) (the block's rows); returns each
        probe's best of the block."""
        top = groups.max(axis=0)
        s = bisect.bisect_right(self.cuts, start)
        if self.cuts[s] >= stop:  # the block lies in one segment
            np.maximum(st.seg[j0:j1, s], top, out=st.seg[j0:j1, s])
            return top
        first = start
        while start < stop:
            end = min(self.cuts[s], stop)
            np.maximum(st.seg[j0:j1, s], blk[start - first : end - first].max(axis=0), out=st.seg[j0:j1, s])
            start, s = end, s + 1
        return top

    def tensor(self, start: int, v) -> None:
        """The GPU's branch: gallery rows start.. against every probe ([rows, probes] on the device): the r best
        of each probe by `topk`, its best per segment by `amax`, kept on the device."""
        import torch

        if self._device is None:
            self._device = (torch.full((self.r, self.n), -math.inf, device=v.device),
                            torch.full((max(1, len(self.cuts)), self.n), -math.inf, device=v.device))  # fmt: skip
        best, seg = self._device
        both = torch.cat([best, v.topk(min(self.r, len(v)), dim=0).values])
        self._device = (both.topk(self.r, dim=0).values, seg)
        base, stop, s = start, start + len(v), bisect.bisect_right(self.cuts, start)
        while start < stop:
            end = min(self.cuts[s], stop)
            seg[s] = torch.maximum(seg[s], v[start - base : end - base].amax(dim=0))
            start, s = end, s + 1

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(best scores [n, r] sorted best first, best per segment [n, segments]) over every thread."""
        states = list(self._states.values()) or [self._state()]
        parts = [s.best() for s in states]
        seg = functools.reduce(np.maximum, [s.seg for s in states])
        if self._device is not None:
            parts.append(self._device[0].T.cpu().numpy())
            seg = np.maximum(seg, self._device[1].T.cpu().numpy()[:, : len(self.cuts)])
        return top_columns(np.concatenate(parts, axis=1), self.r), seg


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
        self._device = None  # the GPU's branch: [identities, probes] on the device
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def block(self, g0: int, lo: int, hi: int, i0: int, i1: int, j0: int, j1: int, v: np.ndarray) -> None:
        a, b = _span_rows(lo, hi, i0, i1)
        if b <= a:
            return
        rows = self.ids[g0 + a : g0 + b]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        reduced = np.maximum.reduceat(v[a - i0 : b - i0], starts, axis=0).T  # [probes, identities]
        idx = rows[starts]
        with self._lock:
            lock = self._locks.setdefault(j0, threading.Lock())
        with lock:
            self.best[j0:j1, idx] = np.maximum(self.best[j0:j1, idx], reduced)

    def tensor(self, start: int, v) -> None:
        """The GPU's branch: gallery rows start.. against every probe, each identity's best by `scatter_reduce_`
        on the device (`best` is filled from it when asked for)."""
        import torch

        if self._device is None:
            self._device = torch.full(self.best.shape[::-1], -math.inf, device=v.device)
        idx = torch.from_numpy(self.ids[start : start + len(v)]).to(v.device)
        self._device.scatter_reduce_(0, idx[:, None].expand_as(v), v, reduce="amax")

    def result(self) -> np.ndarray:
        """[probes, identities]: each probe's best score per identity."""
        if self._device is not None:
            self.best = np.maximum(self.best, self._device.T.cpu().numpy())
            self._device = None
        return self.best
