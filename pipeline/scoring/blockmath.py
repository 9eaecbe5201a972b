"""Row-block arithmetic shared by in-memory, distributed and out-of-core scoring, without torch.

Whatever runs a tile (one process with many BLAS threads, a torchrun rank with one thread, a `--rows` part
reading the store block by block), every pair must get the same float32 value to the last bit, or the
histograms would not add up exactly. Three rules make it so:

1. Products go through `fixed_matmul`: single-threaded BLAS calls on canonical `chunk_side(block)` blocks
   whose borders are multiples of the side in the whole plan (tile borders and diagonal splits fall on them;
   a `--rows` span multiplies the whole blocks it touches), run in parallel by a pool of threads. An entry then
   always comes from a call of the same shape at the same place, whatever the thread count or the path.
2. Rows are transformed block by block by `ScoreDefinition.augment` (`pipeline.scoring.definition`: float32
   rows, per-row float64 norms), so a row's transformed values do not depend on which block it came in.
3. The centring mean is summed in fixed blocks of `STAT_ROWS` store rows (`blocked_mean`), the same blocks
   whether the rows are in memory or streamed from the store.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.random import default_rng  # imported with the module, not at the first call (NumPy loads it lazily)
from threadpoolctl import ThreadpoolController

from pipeline.metrics.binning import Metric

log = logging.getLogger(__name__)

GEMM_K = 256  # inner dimensions are multiplied in chunks of at most this, added in order
SAMPLE_MIN_ROWS = 64  # the bin-range sample has at least this many rows
SMALL_SIDE = 64  # no canonical block thinner than this unless the whole operand is
CHUNK = 512  # side of the canonical products (`fixed_matmul`); tile borders fall on its multiples
STAT_ROWS = 1 << 14  # rows per block of the centring mean
LEAF = 1024  # diagonal blocks are split until this size (smaller products lose more speed than leaves waste)


def chunk_side(block: int) -> int:
    """Side of the canonical products for tiles of `block` rows (every path of one run uses the same)."""
    return max(1, min(CHUNK, block))


@functools.cache
def _blas() -> tuple[Any, int, ThreadPoolExecutor | None]:
    """NumPy's BLAS libraries (one scan of the loaded libraries), the threads they use at the first call (1 under
    torchrun's default OMP_NUM_THREADS=1), and a pool of as many product threads (None for one)."""
    blas = ThreadpoolController().select(user_api="blas")
    n = max((i["num_threads"] for i in blas.info()), default=1)
    pool = ThreadPoolExecutor(n, thread_name_prefix="blas") if n > 1 else None
    return blas, n, pool


def record_product_seconds(seconds: float) -> None:
    """Add `seconds` of tile products to this thread's count, taken by the next `take_product_seconds` here."""
    _local.product_seconds = getattr(_local, "product_seconds", 0.0) + seconds


def take_product_seconds() -> float:
    """Seconds of products this thread computed since the last call (`fixed_matmul` sets them before it hands a
    block over, so the block's counting takes its own product's time)."""
    s = getattr(_local, "product_seconds", 0.0)
    _local.product_seconds = 0.0
    return s


_blas_scope = threading.Lock()
_blas_depth = [0, None]  # scopes entered, the limiter of the outermost


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """NumPy's BLAS limited to one thread inside (the product threads each call it single-threaded: an entry's
    bits then do not depend on the thread count), the limits before restored when the outermost scope ends.
    Nested and concurrent scopes share one limit."""
    blas = _blas()[0]
    with _blas_scope:
        if _blas_depth[0] == 0:
            _blas_depth[1] = blas.limit(limits=1)
        _blas_depth[0] += 1
    try:
        yield
    finally:
        with _blas_scope:
            _blas_depth[0] -= 1
            if _blas_depth[0] == 0:
                _blas_depth[1].restore_original_limits()
                _blas_depth[1] = None


def in_row_pieces(fn: Callable[[int, int], object], n: int) -> None:
    """`fn(a, b)` on consecutive row ranges covering [0, n), one per product thread, run by them (row-wise NumPy
    work releases the GIL); in this thread when there is one."""
    _, threads, pool = _blas()
    k = 1 if pool is None or n < 2 * SMALL_SIDE else threads
    cuts = [n * i // k for i in range(k + 1)]
    if k == 1:
        fn(0, n)
        return
    wait_all([pool.submit(fn, a, b) for a, b in zip(cuts, cuts[1:], strict=False)])


def block_spans(length: int, side: int) -> list[tuple[int, int]]:
    """The canonical blocks [s, e) of `length` rows counted from 0: `side` rows each, the last one taking a
    remainder of fewer than SMALL_SIDE rows (BLAS multiplies very thin products with other kernels)."""
    starts = list(range(0, length, side))
    if len(starts) > 1 and length - starts[-1] < SMALL_SIDE:
        starts.pop()
    return list(zip(starts, starts[1:] + [length], strict=True))


_local = threading.local()


def _scratch(name: str, shape: tuple[int, int]) -> np.ndarray:
    """This thread's reused scratch block `name` (fresh buffers fault in new pages on every call)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < shape[0] * shape[1]:
        buf = np.empty(max(shape[0] * shape[1], CHUNK * CHUNK), dtype=np.float32)
        setattr(_local, name, buf)
    return buf[: shape[0] * shape[1]].reshape(shape)


OnBlock = Callable[[int, int, int, int, np.ndarray], None]
"""on_block(i0, i1, j0, j1, values): rows [i0, i1) of `a` against rows [j0, j1) of `b`, in a worker thread."""


def fixed_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None, side: int = CHUNK,
                 below: int | None = None, on_block: OnBlock | None = None,
                 pending: list[Future] | None = None, strip: int = 1,
                 kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], object] | None = None) -> np.ndarray | None:  # fmt: skip
    """`out = a @ b.T` (float32) as single-threaded BLAS calls on the `side` x `side` blocks of `a` and `b`
    counted from their first rows, run by a pool of threads. Callers pass operands that start at multiples of
    `side` of the whole plan, so an entry always comes from a call of the same shape, at the same place in it,
    whoever computes it: some OpenBLAS kernels (its Haswell ones, which this project's machines select with
    OPENBLAS_CORETYPE) give an entry other bits when the call has other rows, columns or threads. Inner
    dimensions over `GEMM_K` are cut in equal chunks added in order. On a diagonal tile, `below` is the first row's
    offset from the diagonal (`a2 - t.r0`): blocks wholly below it hold no pair, are left out (not written). With `on_block`, each block is computed into a reused block of its
    thread instead (still in cache) and handed to `on_block` there; `out` is not used and None is returned.
    With `on_block` and `pending` too, the blocks are queued on the pool and their futures appended to `pending`
    instead of awaited (the caller waits for them, `wait_all`, inside its own `single_threaded_blas` scope): a
    thread that finishes one tile's last block goes on with the next tile's instead of waiting for the other
    threads. With `on_block` and `strip` > 1, a job computes one block of `a` against `strip` consecutive blocks
    of `b` (each by its own call, as always) side by side and hands them over at once (fewer, larger hand-overs).
    `kernel(ai, bj, out)`: another block product in place of `ai @ bj.T` (whole inner dimension, one call)."""
    jobs = block_jobs(a.shape[0], b.shape[0], side, below)
    k = a.shape[1]
    chunks = -(-k // GEMM_K)
    cuts = [k * c // chunks for c in range(chunks + 1)]

    if on_block is not None and strip > 1:  # a job: one block of `a` against `strip` blocks of `b`
        jobs = [(i, tuple(js)) for i, row in itertools.groupby(jobs, key=lambda ij: ij[0])
                for js in _strips([j for _, j in row], strip)]  # fmt: skip
    else:
        jobs = [(i, (j,)) for i, j in jobs]

    def one(job: tuple[tuple[int, int], tuple[tuple[int, int], ...]]) -> None:
        (i0, i1), js = job
        s0, s1 = js[0][0], js[-1][1]
        ai = a[i0:i1]
        o = out[i0:i1, s0:s1] if on_block is None else _scratch("block", (i1 - i0, s1 - s0))
        start = time.perf_counter()
        for j0, j1 in js:
            bj, oj = b[j0:j1], o[:, j0 - s0 : j1 - s0]
            if kernel is not None:
                kernel(ai, bj, oj)
                continue
            np.matmul(ai[:, cuts[0] : cuts[1]], bj[:, cuts[0] : cuts[1]].T, out=oj)
            if chunks > 1:
                scratch = _scratch("k", oj.shape)
                for k0, k1 in zip(cuts[1:-1], cuts[2:], strict=True):
                    np.matmul(ai[:, k0:k1], bj[:, k0:k1].T, out=scratch)
                    oj += scratch
        if on_block is not None:
            _local.product_seconds = time.perf_counter() - start  # this block's, taken by its counting
            on_block(i0, i1, s0, s1, o)

    pool = _blas()[2]
    with single_threaded_blas():
        if pool is not None and pending is not None and on_block is not None:
            pending.extend(pool.submit(one, ij) for ij in jobs)
        elif pool is None or len(jobs) == 1:
            for ij in jobs:
                one(ij)
        else:
            list(pool.map(one, jobs))
    return out if on_block is None else None


def block_jobs(m: int, n: int, side: int, below: int | None = None) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The canonical blocks (rows of `a`, rows of `b`) `fixed_matmul` multiplies for [m, K] x [n, K]^T: all of
    them, or on a diagonal tile (`below`) those with a pair above the diagonal."""
    return [(i, j) for i in block_spans(m, side) for j in block_spans(n, side) if below is None or below + i[0] < j[1]]


def product_flops(plan: list[Tile], width: int, side: int) -> int:
    """Floating-point operations of the in-memory products of `plan` (operands of `width` columns)."""
    return sum(2 * (i1 - i0) * (j1 - j0) * width for t in plan
               for (i0, i1), (j0, j1) in block_jobs(t.r1 - t.r0, t.c1 - t.c0, side, 0 if t.diagonal else None))  # fmt: skip


def _strips(spans: list[tuple[int, int]], strip: int) -> list[list[tuple[int, int]]]:
    """Consecutive runs of at most `strip` spans."""
    return [spans[k : k + strip] for k in range(0, len(spans), strip)]


def wait_all(futures: list[Future]) -> None:
    """Wait for every future; then raise the first one's exception, if any (no job is left running)."""
    wait(futures)
    for f in futures:
        f.result()


@dataclass(frozen=True)
class Tile:
    """Rows [r0, r1) against columns [c0, c1) of the identity-sorted rows. Off-diagonal tiles have r1 <= c0
    and hold all their pairs; diagonal tiles (r0 == c0, r1 == c1) hold only their upper triangle."""

    r0: int
    r1: int
    c0: int
    c1: int
    diagonal: bool

    @property
    def n_pairs(self) -> int:
        m = self.r1 - self.r0
        return m * (m - 1) // 2 if self.diagonal else m * (self.c1 - self.c0)


def tile_plan(n: int, block: int, leaf: int = LEAF) -> list[Tile]:
    """Every pair i < j of n rows exactly once, in tiles of at most block x block, in a fixed order.

    Diagonal blocks are split near their middle, on a multiple of the product side (one full off-diagonal tile
    and two smaller diagonal blocks), down to `leaf` rows, so almost no product is computed twice. The list depends only on (n, block, leaf): select any
    subset (e.g. `plan[rank::world]`) and the histograms of the parts add up to the whole, bit for bit.
    """
    plan: list[Tile] = []
    starts = list(range(0, n, block))
    side = chunk_side(block)
    for i, r0 in enumerate(starts):
        r1 = min(r0 + block, n)
        plan.extend(_split_diagonal(r0, r1, leaf, side))
        for c0 in starts[i + 1 :]:
            plan.append(Tile(r0, r1, c0, min(c0 + block, n), False))
    return plan


def _split_diagonal(a: int, b: int, leaf: int, side: int) -> Iterator[Tile]:
    m = a + max(side, (b - a) // 2 // side * side)  # near the middle, on a multiple of the product side
    if b - a <= max(leaf, 1) or m >= b:
        if b - a >= 2:
            yield Tile(a, b, a, b, True)
        return
    yield from _split_diagonal(a, m, leaf, side)
    yield Tile(a, m, m, b, False)
    yield from _split_diagonal(m, b, leaf, side)


def balance(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of `costs` dealt to `parts` bins, largest first to the least loaded bin (LPT; ties to the lower
    bin), each bin's indices in increasing order: deterministic, within 4/3 of the best balance."""
    loads = [0] * parts
    bins: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(parts), key=lambda k: (loads[k], k))
        bins[k].append(i)
        loads[k] += costs[i]
    return [sorted(b) for b in bins]


def blocked_mean(blocks: Iterator[np.ndarray], n: int) -> np.ndarray:
    """Column mean (float64 sums of consecutive `STAT_ROWS`-row blocks, added in order) as float32."""
    total = None
    for blk in blocks:  # strided or not, the sums are the same (column by column, row after row)
        s = np.asarray(blk, dtype=np.float32).sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
    return (total / n).astype(np.float32)


def scale_right(right: np.ndarray, lo: float, hi: float, bins: int) -> None:
    """Make `left @ right.T` the bin coordinate `(value - lo) * bins / (hi - lo)` (in place)."""
    s = bins / (hi - lo)
    ones = right.shape[1] - 1  # left's column of ones (`augment`)
    right *= np.float32(s)
    right[:, ones] -= np.float32(s * lo)


def better_extreme(a: tuple, b: tuple, metric: Metric) -> tuple:
    """Of two (value, tile, i, j) candidates for the extreme pair, the one a single pass in plan order keeps:
    the less similar (larger squared distance, smaller cosine), ties to the earlier (tile, i, j)."""
    if not np.isfinite(a[0]):
        return b
    if not np.isfinite(b[0]):
        return a
    if a[0] != b[0]:
        return b if metric.more_similar(a[0], b[0]) else a
    return min(a, b, key=lambda c: c[1:])


SAMPLE_COLS = 1 << 14  # columns per product of the bin-range sample
SAMPLE_RANK = 9  # the range runs between the sample's 10th smallest and 10th largest value


def sample_rows(n: int, seed: int, sample_pairs: int) -> np.ndarray:
    """Sorted store rows of the bin-range sample (each is scored against every other row)."""
    rng = default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, max(SAMPLE_MIN_ROWS, sample_pairs // n)), replace=False))


def products(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """`left @ right.T` as a new float32 array, by `fixed_matmul`."""
    v = np.empty((len(left), len(right)), dtype=np.float32)
    fixed_matmul(left, right, v)
    return v


class SampleRange:
    """The 10th smallest and largest value of the sample rows against every other row, and its `keep`-th
    smallest and largest (where the exact tail starts, `pipeline.metrics.tail.start_rank`), fed column block by
    column block (`add`) in any grouping: only the `keep` extremes of each side are kept."""

    def __init__(self, rows: np.ndarray, n: int, keep: int = 0):
        self.rows, self.n, self.keep = rows, n, max(SAMPLE_RANK + 1, keep)
        self.low: list[np.ndarray] = []
        self.high: list[np.ndarray] = []

    def add(self, v: np.ndarray, c0: int) -> None:
        """`v`: the sample rows' values against columns c0.. (float32, changed here)."""
        own = np.flatnonzero((self.rows >= c0) & (self.rows < c0 + v.shape[1]))
        v[own, self.rows[own] - c0] = np.nan  # a row with itself is no pair
        flat = v[~np.isnan(v)]
        self.low, self.high = (
            [_smallest(np.concatenate([*self.low, flat]), self.keep)],
            [-_smallest(-np.concatenate([*self.high, flat]), self.keep)],
        )

    def near(self, metric: Metric) -> float:
        """The `keep`-th most similar sample value (l2: smallest; cosine: largest)."""
        kept = self.low[0] if metric.low_is_similar else self.high[0]
        side = metric.key(np.sort(metric.key(kept)))  # most similar first
        return float(side[min(self.keep, len(side)) - 1]) if len(side) else math.nan

    def extremes(self) -> tuple[float, float]:
        total = len(self.rows) * (self.n - 1)
        k = min(SAMPLE_RANK, (total - 1) // 2)
        low, high = np.concatenate(self.low).astype(np.float64), np.concatenate(self.high).astype(np.float64)
        return float(np.partition(low, k)[k]), float(np.partition(high, len(high) - 1 - k)[len(high) - 1 - k])


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """The k smallest values (all when fewer), as a new array (no view keeps a block alive)."""
    if len(values) <= k:
        return values.copy()
    return np.partition(values, k - 1)[:k].copy()
