"""All-pairs rows held in memory: read, checked, sorted by identity and transformed once (`prepare`), multiplied
tile by tile by a backend (torch or FAISS), binned over a sample's range (`choose_binning`), and fed to the one
tile loop (`TileScorer`). Memory: the rows twice (the two operands), not the pairs; see docs/design.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.metrics.roc import (
    Binning,
)
from pipeline.metrics.tail import duplicate_ids, exact_ties, start_rank, tail_size
from pipeline.scoring.blockmath import (
    STAT_ROWS,
    OnBlock,
    SampleRange,
    Tile,
    augment,
    bin_range,
    blocked_mean,
    chunk_side,
    fixed_matmul,
    in_row_pieces,
    operand_width,
    sample_rows,
    scale_right,
)
from pipeline.scoring.tiles import TileLoop
from pipeline.store.layout import Store, bad_rows_error

log = logging.getLogger(__name__)
READ_ROWS_BYTES = 64 << 20  # rows read from the store at a time
SORT_ROWS = 1024  # rows gathered into label order at a time


@dataclass
class Prepared:
    """The store's rows sorted by identity, ready for tiles: `left @ right.T` is the binned value."""

    x: np.ndarray
    """[N, D] float32 sorted rows, centred (l2) or normalised (cosine): a view into `left`."""
    left: torch.Tensor
    """[N, D+2] rows [x, |x|^2, 1] (l2), [N, D+1] rows [x, 1] (cosine) or [N, D+2] rows [x, -o, 1] (cosine with
    score offsets o): `pipeline.scoring.blockmath.augment`."""
    right: torch.Tensor
    """[N, D+2] rows [-2x, 1, |x|^2] (l2), [N, D+1] rows [x, 0] (cosine) or [N, D+2] rows [x, 1, -o] (cosine with
    offsets): `left @ right.T` is the value."""
    labels: torch.Tensor
    """[N] int64 sorted labels on the device."""
    order: np.ndarray
    """Sorted position -> store row."""
    group_start: np.ndarray
    group_end: np.ndarray
    metric: str
    max_norm: float
    n_positive: int
    dups: np.ndarray | None = None
    """Per sorted row, the id of its class of identical rows (-1: none); None when no two rows are identical."""
    offsets: np.ndarray | None = None
    """Per sorted row, its score offset (float32; cosine only): a pair's value is cos - o_i - o_j. None: none."""

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def offset_range(self) -> tuple[float, float] | None:
        """(smallest, largest) score offset, or None."""
        return None if self.offsets is None else (float(self.offsets.min()), float(self.offsets.max()))

    def scale_to_bins(self, b: Binning) -> None:
        """Make `left @ right.T` the bin coordinate `(value - lo) * bins / (hi - lo)` (in place, once): bin k
        holds coordinates [k, k+1). Nearest neighbours are unchanged (a positive scale and a shift)."""
        if self.right.device.type == "cpu":  # the same float32 operations as out-of-core blocks
            scale_right(self.right.numpy(), b.lo, b.hi, b.bins)
            return
        s = b.bins / (b.hi - b.lo)
        ones = self.right.shape[1] - 1  # left's column of ones
        self.right *= float(np.float32(s))
        self.right[:, ones] -= float(np.float32(s * b.lo))


def read_rows(store: Store, out: np.ndarray | None = None) -> np.ndarray:
    """All rows as float32 into `out` (C-contiguous [n, D] float32; new when None), read in blocks straight from
    the store. NaN or infinite rows are an error that names them."""
    n, d = store.n, store.dim
    out = np.empty((n, d), dtype=np.float32) if out is None else out
    step = max(1, READ_ROWS_BYTES // max(1, d * 4))
    bad: list[int] = []
    for s in range(0, n, step):
        blk = store.read_into(s, min(s + step, n), out)
        ok = np.isfinite(blk.sum(axis=1))  # NaN and inf propagate; an overflowing sum is checked exactly
        if not ok.all():
            ok = np.isfinite(blk).all(axis=1)
        if not ok.all():
            bad.extend((np.flatnonzero(~ok) + s).tolist())
    if bad:
        raise bad_rows_error(store, bad)
    return out


def normalise(x: np.ndarray, what: str, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit length (norms in float64); zero rows are an error (cosine undefined)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise PipelineError(
            f"{what}: {len(zero)} rows are all zeros (rows {zero[:10].tolist()}): their cosine is undefined. "
            f"Use --metric l2."
        )
    if inplace:
        x /= norms[:, None].astype(x.dtype)
        return x
    return (x / norms[:, None]).astype(np.float32)


def prepare(store: Store, metric: str, device: torch.device, score_norm: bool = True) -> Prepared:
    """Read, check, sort by identity and transform the rows of `store` for tile products on `device`; with the
    store's score offsets unless `score_norm` is False."""
    if store.n < 2:
        raise PipelineError(f"{store.path} has {store.n} row(s): scoring needs at least two")
    offsets = store.score_offsets(metric, score_norm)
    labels = store.labels
    order = np.argsort(labels, kind="stable")
    if offsets is not None:
        offsets = offsets[order]
    d = store.dim
    left_np = np.empty((store.n, operand_width(d, metric, offsets is not None)), dtype=np.float32)
    right_np = np.empty_like(left_np)
    # read into `right`'s memory (contiguous rows read fastest), then copied in label order into `left`, whose
    # first D columns are transformed there; `augment` then overwrites all of `right` (no third copy of the rows)
    stored = read_rows(store, out=right_np.reshape(-1)[: store.n * d].reshape(store.n, d))
    unsorted = bool((np.diff(labels) < 0).any())  # stores of `embed` are sorted by person already

    def copy(a: int, b: int) -> None:  # by the product threads: the first touch of `left` costs page faults
        for s in range(a, b, SORT_ROWS):
            e = min(s + SORT_ROWS, b)
            left_np[s:e, :d] = stored[order[s:e]] if unsorted else stored[s:e]

    in_row_pieces(copy, store.n)
    ls = labels[order]
    cuts = np.flatnonzero(np.diff(ls)) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(ls)]
    sizes = ends - starts
    n_positive = int((sizes * (sizes - 1) // 2).sum())
    gid = np.repeat(np.arange(len(starts)), sizes)
    x = left_np[:, :d]
    mean = None
    if metric == "l2":  # centred: distances unchanged, less cancellation
        mean = blocked_mean((x[s : s + STAT_ROWS] for s in range(0, store.n, STAT_ROWS)), store.n)
    sq = np.empty(store.n, dtype=np.float64)
    for s in range(0, store.n, STAT_ROWS):  # per block, as out-of-core scoring does; row by row the same

        def piece(a: int, b: int, s: int = s) -> None:
            o = None if offsets is None else offsets[s + a : s + b]
            sq[s + a : s + b] = augment(
                x[s + a : s + b], mean, metric, left_np[s + a : s + b], right_np[s + a : s + b], o
            )

        in_row_pieces(piece, min(STAT_ROWS, store.n - s))
    if metric == "cosine":
        zero = np.flatnonzero(sq == 0)
        if len(zero):
            raise PipelineError(
                f"{store.path}: {len(zero)} rows are all zeros (sorted rows {zero[:10].tolist()}): their cosine "
                f"is undefined. Use --metric l2."
            )
    max_norm = float(np.sqrt(sq.max())) if metric == "l2" else 1.0
    left, right = torch.from_numpy(left_np), torch.from_numpy(right_np)
    left, right = left.to(device), right.to(device)
    dups = duplicate_ids(sq, lambda i: x[i])  # identical rows: exact ties in the exact tail
    return Prepared(
        x,
        left,
        right,
        torch.from_numpy(ls).to(device),
        order,
        starts[gid],
        ends[gid],
        metric,
        max_norm,
        n_positive,
        dups,
        offsets,
    )


# ---------------------------------------------------------------------------------------------------- backends


class TorchTiles:
    """Tile values by one matrix product into a reused buffer. On the CPU with `gemm="auto"` the product goes
    through NumPy's BLAS into the same memory (OpenBLAS: as fast on half-size tiles as on 4096 x 4096 ones,
    where torch's MKL loses up to 1.5x on AMD CPUs); everything else stays in torch."""

    name = "torch"

    def __init__(self, prep: Prepared, block: int, gemm: str = "auto"):
        self.prep, self.block = prep, block
        self.numpy = gemm == "numpy" or (gemm == "auto" and prep.left.device.type == "cpu")
        self.side = chunk_side(block)
        self._buf: torch.Tensor | None = None  # a whole tile, only where one is asked for (torch products)
        if self.numpy:
            self.np_left, self.np_right = prep.left.numpy(), prep.right.numpy()

    def buffer(self, size: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(
                min(self.block, self.prep.n) ** 2, dtype=torch.float32, device=self.prep.left.device
            )
        return self._buf[:size]

    def values(self, t: Tile, on_block: OnBlock | None = None, pending: list | None = None) -> torch.Tensor | None:
        """The tile's values; on the CPU with `on_block`, handed over block by block instead (None returned;
        queued, with `pending`: `pipeline.scoring.blockmath.fixed_matmul`)."""
        m, k = t.r1 - t.r0, t.c1 - t.c0
        if self.numpy:
            below = 0 if t.diagonal else None
            a, b = self.np_left[t.r0 : t.r1], self.np_right[t.c0 : t.c1]
            if on_block is not None:
                return fixed_matmul(a, b, None, side=self.side, below=below, on_block=on_block, pending=pending)
            buf = self.buffer(m * k)
            fixed_matmul(a, b, buf.numpy().reshape(m, k), side=self.side, below=below)
            return buf.view(m, k)
        out = self.buffer(m * k).view(m, k)
        return torch.mm(self.prep.left[t.r0 : t.r1], self.prep.right[t.c0 : t.c1].T, out=out)


class FaissTiles:
    """Tile values by `faiss.pairwise_distances` (squared L2 or inner product, minus the rows' score offsets) on
    the CPU."""

    name = "faiss"

    def __init__(self, prep: Prepared, binning: Binning):
        import faiss

        self.faiss = faiss
        self.prep = prep
        self.lo, self.scale = np.float32(binning.lo), np.float32(binning.bins / (binning.hi - binning.lo))
        self.x = np.ascontiguousarray(prep.x)
        self.metric = faiss.METRIC_L2 if prep.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.device = prep.left.device

    def values(self, t: Tile, on_block: OnBlock | None = None, pending: list | None = None) -> torch.Tensor:
        x, o = self.x, self.prep.offsets
        v = self.faiss.pairwise_distances(x[t.r0 : t.r1], x[t.c0 : t.c1], self.metric)
        if o is not None:  # cos - o_i - o_j
            v -= o[t.r0 : t.r1, None]
            v -= o[None, t.c0 : t.c1]
        v -= self.lo
        v *= self.scale  # bin coordinates, as the torch backend's products give them
        return torch.from_numpy(v).to(self.device)


def make_backend(name: str, prep: Prepared, block: int, binning: Binning, gemm: str = "auto"):
    """The tile backend; FAISS when asked for and importable (CPU), else torch with a message."""
    if name == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            log.warning("--backend faiss: faiss is not installed (pip install faiss-cpu); using torch instead")
            return TorchTiles(prep, block, gemm)
        if prep.left.device.type != "cpu":
            log.warning("--backend faiss computes on the CPU here; the histograms stay on %s", prep.left.device)
        return FaissTiles(prep, binning)
    return TorchTiles(prep, block, gemm)


# ---------------------------------------------------------------------------------------------------- binning


def choose_binning(prep: Prepared, bins: int, seed: int = 0, sample_pairs: int = 1 << 18) -> Binning:
    """Bins over the score range of a sample: random rows against every other row (about `sample_pairs`
    pairs). The range runs between the sample's 10th smallest and 10th largest value, widened by 5% of the span
    on each side and kept inside the provable range. Rare outliers (duplicate images at distance 0) then do not
    stretch the bins: scores outside count in the edge bins, still correct, only coarser there, and
    `auc_error_bound` accounts for them."""
    n = prep.n
    rows = sample_rows(n, seed, sample_pairs)
    n_pairs = n * (n - 1) // 2
    keep = start_rank(tail_size(n_pairs, prep.n_positive), n_pairs, len(rows) * (n - 1))
    if prep.left.device.type == "cpu":  # NumPy's BLAS in fixed blocks, as out-of-core scoring does
        rng_ = SampleRange(rows, n, keep)
        rng_.add(prep.left.numpy()[rows], prep.right.numpy(), 0)
        vmin, vmax = rng_.extremes()
        near = rng_.near(prep.metric)
    else:
        it = torch.from_numpy(rows).to(prep.left.device)
        every = []
        for c0 in range(0, n, 1 << 14):
            v = prep.left[it] @ prep.right[c0 : c0 + (1 << 14)].T
            cols = torch.arange(c0, c0 + v.shape[1], device=v.device)
            every.append(v[cols[None, :] != it[:, None]])
        allv = torch.cat(every).double().cpu().numpy()
        k = min(9, (len(allv) - 1) // 2)
        vmin = float(np.partition(allv, k)[k])
        vmax = float(np.partition(allv, len(allv) - 1 - k)[len(allv) - 1 - k])
        r = min(keep, len(allv)) - 1
        near = float(np.partition(allv, r)[r] if prep.metric == "l2" else -np.partition(-allv, r)[r])
    lo, hi = bin_range(vmin, vmax, prep.metric, prep.max_norm, prep.offset_range)
    return Binning(float(lo), float(hi), bins, prep.metric, near)


# ---------------------------------------------------------------------------------------------------- tile pass


class TileScorer(TileLoop):
    """The tile loop over the rows held in memory (sorted by identity): tiles from a backend, store rows of
    the extreme pair through the sort order."""

    def __init__(self, prep: Prepared, binning: Binning, backend, counting: str = "auto", tail_k: int = 0):
        ties = exact_ties(binning, prep.dups, prep.offsets)
        super().__init__(binning, lambda t, a2, b2, on_block=None, pending=None: backend.values(t, on_block, pending), prep.labels.cpu().numpy(), prep.metric,
                         prep.order, prep.left.device, counting, tail_k=tail_k, ties=ties)  # fmt: skip
        self.prep, self.backend = prep, backend
