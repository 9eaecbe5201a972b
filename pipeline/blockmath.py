"""Row-block arithmetic shared by in-memory, distributed and out-of-core scoring, without torch.

Whatever runs a tile (one process with many BLAS threads, a torchrun rank with one thread, a `--rows` part
reading the store block by block), every pair must get the same float32 value to the last bit, or the
histograms would not add up exactly. Three rules make it so:

1. Products go through `fixed_matmul`: the inner dimension is cut into chunks of at most `GEMM_K` (OpenBLAS
   splits longer inner dimensions differently with different thread counts; up to 512 it does not), and
   products with a side smaller than `MIN_SIDE` are never formed on their own (BLAS switches to other kernels
   there): callers compute the whole tile instead and slice it. The BLAS itself is checked once per process
   (`gemm_engine`): some of OpenBLAS's kernels (its Haswell ones, which it also picks for AMD Zen 5) give an
   entry other bits when the call has other rows or threads; there the products go through torch (MKL).
2. Rows are transformed block by block by `augment` (contiguous float32 copies, per-row float64 norms), so a
   row's transformed values do not depend on which block it came in.
3. The centring mean is summed in fixed blocks of `STAT_ROWS` store rows (`blocked_mean`), the same blocks
   whether the rows are in memory or streamed from the store.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

try:  # SciPy's sgemm takes beta (accumulate into the output); NumPy's matmul does not
    from scipy.linalg.blas import sgemm as _sgemm
except ImportError:  # pragma: no cover
    _sgemm = None

log = logging.getLogger(__name__)

GEMM_K = 256  # inner dimensions up to this are multiplied identically with 1 or many threads (OpenBLAS: 500 is not)
MIN_SIDE = 64  # no product with fewer rows than this unless the tile itself is that small
STAT_ROWS = 1 << 14  # rows per block of the centring mean
LEAF = 1024  # diagonal blocks are split until this size (smaller products lose more speed than leaves waste)


COUNT_CHUNK = 1 << 20  # values per bincount call (at least 4x the bins): one reused 8 MB index buffer


class BinCounts:
    """Histogram counts on the CPU: bin coordinates (already clipped to [0, bins-1]) truncated to integers and
    `np.bincount`-ed, in chunks through one reused intp buffer: bincount copies any other input to intp, and
    fresh buffers of tile size cost page faults on every call (cProfile of a cold `score --all-pairs` of the
    3,708-row LFWPeople test store: counting took 0.08-0.09 s that way, 0.025 s this way).
    Single threaded, so that no second thread pool takes turns with the BLAS threads of the products."""

    def __init__(self, bins: int):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.chunk = max(COUNT_CHUNK, 4 * bins)
        self.ibuf = np.empty(0, dtype=np.intp)  # grown to the largest input up to `chunk`, then reused

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)  # a copy only for strided slices (the small same-person rectangles)
        if len(self.ibuf) < min(flat.size, self.chunk):
            self.ibuf = np.empty(min(flat.size, self.chunk), dtype=np.intp)
        for s in range(0, flat.size, self.chunk):
            part = flat[s : s + self.chunk]
            iv = self.ibuf[: part.size]
            np.copyto(iv, part, casting="unsafe")  # truncation = floor for coordinates >= 0
            self.counts += np.bincount(iv, minlength=self.bins)


def _numpy_mm(a: np.ndarray, b: np.ndarray, threads: int) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        return a @ b.T


def _torch_mm(a: np.ndarray, b: np.ndarray, threads: int) -> np.ndarray:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return torch.mm(torch.from_numpy(a), torch.from_numpy(b).T).numpy()
    finally:
        torch.set_num_threads(before)


def _consistent(mm) -> bool:
    """Does `mm` give each entry the same bits with 1 and 2 threads and for a call on a slice of the rows or
    columns? (The same fixed sizes in every process, so that every rank of a run decides alike.)"""
    rng = np.random.default_rng(0)
    for k in (24, 200):
        a = rng.standard_normal((320, k)).astype(np.float32)
        b = rng.standard_normal((288, k)).astype(np.float32)
        whole = mm(a, b, 1)
        if not (
            np.array_equal(mm(a, b, 2), whole)
            and np.array_equal(mm(a[96:], b, 1), whole[96:])
            and np.array_equal(mm(a[96:], b, 2), whole[96:])
            and np.array_equal(mm(a, b[64:], 2), whole[:, 64:])
        ):
            return False
    return True


@functools.cache
def gemm_engine() -> str:
    """'numpy' (its BLAS, OpenBLAS) when it multiplies bit-consistently, else 'torch' (MKL) when that does;
    'numpy' with a warning when neither does (then parts and ranks may differ from one process in a few bins)."""
    if _consistent(_numpy_mm):
        return "numpy"
    if _consistent(_torch_mm):
        log.info("NumPy's BLAS gives other bits for other call shapes on this CPU: tile products use torch")
        return "torch"
    log.warning("neither NumPy's BLAS nor torch multiplies bit-consistently here: --rows parts and torchrun ranks "
                "may differ from a single process in a few bins")  # fmt: skip
    return "numpy"


def fixed_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """`out = a @ b.T` (float32) with the inner dimension in equal chunks of at most `GEMM_K`, added in order;
    `tmp` (same shape as `out`) is scratch for the chunks after the first. Through `gemm_engine()`."""
    k = a.shape[1]
    chunks = -(-k // GEMM_K)
    if gemm_engine() == "torch":
        return _fixed_matmul_torch(a, b, out, [k * i // chunks for i in range(chunks + 1)])
    if chunks <= 1:
        return np.matmul(a, b.T, out=out)
    cuts = [k * i // chunks for i in range(chunks + 1)]
    if _sgemm is not None and out.flags.c_contiguous and out.dtype == np.float32:
        # BLAS accumulates each chunk into `out` itself (beta = 1): the same sums as the adds below, less traffic
        ct = out.T  # Fortran-ordered view: out^T = b a^T
        for i, (k0, k1) in enumerate(zip(cuts, cuts[1:], strict=False)):
            r = _sgemm(1.0, b[:, k0:k1].T, a[:, k0:k1].T, beta=0.0 if i == 0 else 1.0, c=ct, trans_a=1, overwrite_c=1)
            if not np.shares_memory(r, ct):  # pragma: no cover (SciPy copied `c`)
                ct[...] = r
        return out
    np.matmul(a[:, cuts[0] : cuts[1]], b[:, cuts[0] : cuts[1]].T, out=out)
    scratch = np.empty_like(out) if tmp is None else tmp
    for k0, k1 in zip(cuts[1:-1], cuts[2:], strict=True):
        np.matmul(a[:, k0:k1], b[:, k0:k1].T, out=scratch)
        out += scratch
    return out


def _fixed_matmul_torch(a: np.ndarray, b: np.ndarray, out: np.ndarray, cuts: list[int]) -> np.ndarray:
    import torch

    ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)  # views: no copies
    torch.mm(ta[:, cuts[0] : cuts[1]], tb[:, cuts[0] : cuts[1]].T, out=to)
    for k0, k1 in zip(cuts[1:-1], cuts[2:], strict=True):
        to.addmm_(ta[:, k0:k1], tb[:, k0:k1].T)
    return out


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

    Diagonal blocks are split in halves (one full off-diagonal tile and two smaller diagonal blocks) down to
    `leaf` rows, so almost no product is computed twice. The list depends only on (n, block, leaf): select any
    subset (e.g. `plan[rank::world]`) and the histograms of the parts add up to the whole, bit for bit.
    """
    plan: list[Tile] = []
    starts = list(range(0, n, block))
    for i, r0 in enumerate(starts):
        r1 = min(r0 + block, n)
        plan.extend(_split_diagonal(r0, r1, leaf))
        for c0 in starts[i + 1 :]:
            plan.append(Tile(r0, r1, c0, min(c0 + block, n), False))
    return plan


def _split_diagonal(a: int, b: int, leaf: int) -> Iterator[Tile]:
    if b - a <= max(leaf, 1):
        if b - a >= 2:
            yield Tile(a, b, a, b, True)
        return
    m = (a + b) // 2
    yield from _split_diagonal(a, m, leaf)
    yield Tile(a, m, m, b, False)
    yield from _split_diagonal(m, b, leaf)


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
    for blk in blocks:
        s = np.ascontiguousarray(blk, dtype=np.float32).sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
    return (total / n).astype(np.float32)


def augment(x: np.ndarray, mean: np.ndarray | None, metric: str, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Rows `x` (float32) into `left`/`right` (views of the tile operands, [m, D+2] for l2, [m, D+1] for cosine):
    l2 `[x-mean, |x-mean|^2, 1]` and `[-2(x-mean), 1, |x-mean|^2]`; cosine `[x/|x|, 1]` and `[x/|x|, 0]`.
    Returns the per-row float64 squared norms (of the centred rows, l2; of the raw rows, cosine)."""
    d = x.shape[1]
    xc = np.array(x, dtype=np.float32, order="C", copy=True)
    if metric == "l2":
        xc -= mean
        sq = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
        left[:, :d] = xc
        left[:, d], left[:, d + 1] = sq, 1.0
        np.multiply(xc, np.float32(-2.0), out=right[:, :d])
        right[:, d], right[:, d + 1] = 1.0, sq
        return sq
    sq = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
    if (sq > 0).all():
        xc /= np.sqrt(sq)[:, None].astype(np.float32)
    left[:, :d], right[:, :d] = xc, xc
    left[:, d], right[:, d] = 1.0, 0.0
    return sq


def scale_right(right: np.ndarray, lo: float, hi: float, bins: int, d: int, metric: str) -> None:
    """Make `left @ right.T` the bin coordinate `(value - lo) * bins / (hi - lo)` (in place)."""
    s = bins / (hi - lo)
    ones = d + (1 if metric == "l2" else 0)  # left's column of ones
    right *= np.float32(s)
    right[:, ones] -= np.float32(s * lo)


def pair_distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """Distance of two stored rows in float64: Euclidean, or 1 - cosine."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "l2":
        return float(np.sqrt(((a - b) ** 2).sum()))
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def better_extreme(a: tuple, b: tuple, metric: str) -> tuple:
    """Of two (value, tile, i, j) candidates for the extreme pair, the one a single pass in plan order keeps:
    the larger squared distance (l2) or smaller cosine (cosine), ties to the earlier (tile, i, j)."""
    if not np.isfinite(a[0]):
        return b
    if not np.isfinite(b[0]):
        return a
    if a[0] != b[0]:
        return a if (a[0] > b[0]) == (metric == "l2") else b
    return min(a, b, key=lambda c: c[1:])


SAMPLE_COLS = 1 << 14  # columns per product of the bin-range sample
SAMPLE_RANK = 9  # the range runs between the sample's 10th smallest and 10th largest value


def sample_rows(n: int, seed: int, sample_pairs: int) -> np.ndarray:
    """Sorted store rows of the bin-range sample (each is scored against every other row)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, max(MIN_SIDE, sample_pairs // n)), replace=False))


class SampleRange:
    """The 10th smallest and largest value of the sample rows against every other row, fed column block by
    column block (`add`) in any grouping: only the extremes of each block are kept."""

    def __init__(self, rows: np.ndarray, n: int):
        self.rows, self.n = rows, n
        self.low: list[np.ndarray] = []
        self.high: list[np.ndarray] = []

    def add(self, left_rows: np.ndarray, right_cols: np.ndarray, c0: int) -> None:
        """`left_rows`: the sample's left operands; `right_cols`: right operands of columns c0.. ."""
        for s in range(0, len(right_cols), SAMPLE_COLS):
            blk = right_cols[s : s + SAMPLE_COLS]
            v = np.empty((len(left_rows), len(blk)), dtype=np.float32)
            fixed_matmul(left_rows, blk, v)
            own = np.flatnonzero((self.rows >= c0 + s) & (self.rows < c0 + s + len(blk)))
            v[own, self.rows[own] - c0 - s] = np.nan  # a row with itself is no pair
            flat = v[~np.isnan(v)]
            k = min(SAMPLE_RANK + 1, len(flat))
            if k:
                self.low.append(np.partition(flat, k - 1)[:k].copy())  # copies: no view keeps the block alive
                self.high.append(np.partition(flat, len(flat) - k)[len(flat) - k :].copy())

    def extremes(self) -> tuple[float, float]:
        total = len(self.rows) * (self.n - 1)
        k = min(SAMPLE_RANK, (total - 1) // 2)
        low, high = np.concatenate(self.low).astype(np.float64), np.concatenate(self.high).astype(np.float64)
        return float(np.partition(low, k)[k]), float(np.partition(high, len(high) - 1 - k)[len(high) - 1 - k])


def bin_range(vmin: float, vmax: float, metric: str, max_norm: float) -> tuple[float, float]:
    """[lo, hi] of the bins: the sample's range widened by 5% each side, inside the provable range."""
    margin = 0.05 * (vmax - vmin) or 1e-6 * max(1.0, abs(vmax))
    if metric == "l2":
        lo, hi = max(vmin - margin, 0.0), min(vmax + margin, 4.0 * max_norm**2 * (1 + 1e-4) + 1e-30)
    else:
        lo, hi = max(vmin - margin, -1.0 - 1e-4), min(vmax + margin, 1.0 + 1e-4)
    if not hi > lo:
        hi = lo + max(1e-6, abs(lo) * 1e-6)
    return float(lo), float(hi)
