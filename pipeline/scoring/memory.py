"""All-pairs rows held in memory (`MemoryRows`, a row source of `pipeline.scoring.sources`): read and checked
once, sorted by identity and transformed into the two tile operands, multiplied tile by tile by a backend
(torch or FAISS). Memory: the rows twice (the two operands), not the pairs; see docs/design.md."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.metrics.binning import Binning
from pipeline.scoring.blockmath import (
    SAMPLE_COLS,
    STAT_ROWS,
    OnBlock,
    Tile,
    blocked_mean,
    chunk_side,
    fixed_matmul,
    in_row_pieces,
    scale_right,
)
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.faiss_blas import faiss_single_threaded, import_faiss
from pipeline.scoring.sorted_rows import label_order
from pipeline.scoring.sources import RowSource, read_rows
from pipeline.store.layout import Store

log = logging.getLogger(__name__)
SORT_ROWS = 1024  # rows gathered into label order at a time


class MemoryRows(RowSource):
    """The store's rows sorted by identity, ready for tiles on `device`: `left @ right.T` is the binned value.

    `left`: [N, W] rows [x, |x|^2, 1] (l2), [x, 1] (cosine) or [x, -o, 1] (cosine with score offsets o);
    `right`: [-2x, 1, |x|^2], [x, 0] or [x, 1, -o] (`ScoreDefinition.augment`); `x`: the [N, D] sorted rows,
    centred (l2) or normalised (cosine), a view into `left`'s memory on the CPU."""

    def __init__(self, store: Store, score: ScoreDefinition, device: torch.device):
        super().__init__(store, score, label_order(store.labels))
        self.device = device
        left, right = self._read_sorted()
        self.x = left[:, : self.dim]
        mean = None
        if score.euclidean:  # centred: distances unchanged, less cancellation
            mean = blocked_mean((self.x[s : s + STAT_ROWS] for s in range(0, self.n, STAT_ROWS)), self.n)
        sq = self._transform(left, right, mean)
        self.stats = self._stats(mean, sq, lambda i: self.x[i])
        self.left, self.right = torch.from_numpy(left).to(device), torch.from_numpy(right).to(device)

    def _read_sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """The two operands, with the rows in label order in `left`'s first D columns. The rows are read into
        `right`'s memory (contiguous rows read fastest), then copied in label order into `left`; `augment` then
        overwrites all of `right` (no third copy of the rows)."""
        n, d, order = self.n, self.dim, self.order
        left = np.empty((n, self.score.width(d)), dtype=np.float32)
        right = np.empty_like(left)
        stored = read_rows(self.store, out=right.reshape(-1)[: n * d].reshape(n, d))

        def copy(a: int, b: int) -> None:  # by the product threads: the first touch of `left` costs page faults
            for s in range(a, b, SORT_ROWS):
                e = min(s + SORT_ROWS, b)
                left[s:e, :d] = stored[s:e] if order is None else stored[order[s:e]]

        in_row_pieces(copy, n)
        return left, right

    def _transform(self, left: np.ndarray, right: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
        """`augment` in place, per `STAT_ROWS` block as out-of-core scoring does (row by row the same), by the
        product threads; returns the float64 squared norms."""
        x, offsets, sq = self.x, self.offsets, np.empty(self.n, dtype=np.float64)
        for s in range(0, self.n, STAT_ROWS):

            def piece(a: int, b: int, s: int = s) -> None:
                o = None if offsets is None else offsets[s + a : s + b]
                sq[s + a : s + b] = self.score.augment(x[s + a : s + b], mean, left[s + a : s + b],
                                                       right[s + a : s + b], o)  # fmt: skip

            in_row_pieces(piece, min(STAT_ROWS, self.n - s))
        return sq

    def sample_left(self, rows: np.ndarray) -> np.ndarray:
        return self.left.numpy()[rows]

    def right_columns(self, c0: int, c1: int) -> np.ndarray:
        return self.right.numpy()[c0:c1]

    def sample_values(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if self.device.type == "cpu":  # NumPy's BLAS in fixed blocks, as out-of-core scoring does
            yield from super().sample_values(rows)
            return
        it = torch.from_numpy(rows).to(self.device)
        for c0 in range(0, self.n, SAMPLE_COLS):
            yield c0, (self.left[it] @ self.right[c0 : c0 + SAMPLE_COLS].T).cpu().numpy()

    def scale_to_bins(self, b: Binning) -> None:
        """Make `left @ right.T` the bin coordinate `(value - lo) * bins / (hi - lo)` (in place, once): bin k
        holds coordinates [k, k+1). Nearest neighbours are unchanged (a positive scale and a shift)."""
        if self.device.type == "cpu":  # the same float32 operations as out-of-core blocks
            scale_right(self.right.numpy(), b.lo, b.hi, b.bins)
            return
        s = b.bins / (b.hi - b.lo)
        ones = self.right.shape[1] - 1  # left's column of ones
        self.right *= float(np.float32(s))
        self.right[:, ones] -= float(np.float32(s * b.lo))

    def tiles(self, cfg: ScoreConfig, binning: Binning):
        """The backend of `cfg` (`make_backend`)."""
        return make_backend(cfg.backend, self, cfg.block, binning, cfg.gemm)


# ---------------------------------------------------------------------------------------------------- backends


class TorchTiles:
    """Tile values by one matrix product into a reused buffer. On the CPU with `gemm="auto"` the product goes
    through NumPy's BLAS into the same memory (OpenBLAS: as fast on half-size tiles as on 4096 x 4096 ones,
    where torch's MKL is slower on AMD CPUs); everything else stays in torch."""

    name = "torch"

    def __init__(self, rows: MemoryRows, block: int, gemm: str = "auto"):
        self.rows, self.block = rows, block
        self.numpy = gemm == "numpy" or (gemm == "auto" and rows.left.device.type == "cpu")
        self.side = chunk_side(block)
        self._buf: torch.Tensor | None = None  # a whole tile, only where one is asked for (torch products)
        if self.numpy:
            self.np_left, self.np_right = rows.left.numpy(), rows.right.numpy()

    def buffer(self, size: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(
                min(self.block, self.rows.n) ** 2, dtype=torch.float32, device=self.rows.left.device
            )
        return self._buf[:size]

    def values(self, t: Tile, a2: int | None = None, b2: int | None = None, on_block: OnBlock | None = None,
               pending: list | None = None) -> torch.Tensor | None:  # fmt: skip
        """The whole tile's values (rows held in memory are multiplied whole: `a2`, `b2` are its rows); on the
        CPU with `on_block`, handed over block by block instead (None returned; queued, with `pending`:
        `pipeline.scoring.blockmath.fixed_matmul`)."""
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
        return torch.mm(self.rows.left[t.r0 : t.r1], self.rows.right[t.c0 : t.c1].T, out=out)


class FaissTiles:
    """Squared L2 tile values by FAISS (`faiss.pairwise_L2sqr`, FAISS's OpenBLAS on current kernels:
    `pipeline.scoring.faiss_blas`) on the default backend's canonical blocks (`fixed_matmul`): each block one
    single-threaded call in a product thread, turned into bin coordinates there while in cache, and counted by
    that thread. The blocks do not depend on the path, so one process and torchrun ranks agree bit for bit, and
    a diagonal tile's blocks below the diagonal are not computed."""

    name = "faiss"

    def __init__(self, rows: MemoryRows, block: int, binning: Binning):
        self.faiss = import_faiss()
        self.rows, self.side = rows, chunk_side(block)
        self.x = rows.x  # the centred rows: a strided view of the left operand's memory, on the CPU on any device
        self.lo, self.scale = np.float32(binning.lo), np.float32(binning.scale)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """FAISS single-threaded while a pass's blocks run (the product threads are the parallelism): its
        OpenBLAS, and its OpenMP teams of this thread (each product thread sets its own, `_block`)."""
        before = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(1)
        try:
            with faiss_single_threaded():
                yield
        finally:
            self.faiss.omp_set_num_threads(before)

    def _block(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """`out` = bin coordinates of the squared distances between the rows of `a` and `b` (views; any strides)."""
        f = self.faiss
        f.omp_set_num_threads(1)  # libgomp keeps the setting per calling thread: this product thread's
        ptr = f.cast_integer_to_float_ptr
        f.pairwise_L2sqr(a.shape[1], len(a), ptr(a.ctypes.data), len(b), ptr(b.ctypes.data), ptr(out.ctypes.data),
                         a.strides[0] // 4, b.strides[0] // 4, out.strides[0] // 4)  # fmt: skip
        np.subtract(out, self.lo, out=out)
        np.multiply(out, self.scale, out=out)

    def values(self, t: Tile, a2: int | None = None, b2: int | None = None, on_block: OnBlock | None = None,
               pending: list | None = None) -> torch.Tensor | None:  # fmt: skip
        """As `TorchTiles.values` (the whole tile, or block by block to `on_block`), by FAISS."""
        a, b = self.x[t.r0 : t.r1], self.x[t.c0 : t.c1]
        below = 0 if t.diagonal else None
        if on_block is not None:
            return fixed_matmul(a, b, None, side=self.side, below=below, on_block=on_block, pending=pending,
                                kernel=self._block)  # fmt: skip
        out = np.empty((len(a), len(b)), dtype=np.float32)  # blocks below a diagonal are not read
        with self.scope():
            fixed_matmul(a, b, out, side=self.side, below=below, kernel=self._block)
        return torch.from_numpy(out).to(self.rows.device)


def make_backend(name: str, rows: MemoryRows, block: int, binning: Binning, gemm: str = "auto"):
    """The tile backend; FAISS when asked for, importable and the metric l2, else torch with a message (FAISS's
    own inner products are NumPy's matrix product: `faiss.pairwise_distances`)."""
    if name == "faiss" and not rows.score.euclidean:
        log.info("--backend faiss: FAISS computes inner products with NumPy's BLAS, as the default backend does; "
                 "cosine runs on the default backend")  # fmt: skip
        return TorchTiles(rows, block, gemm)
    if name == "faiss":
        try:
            import_faiss()
        except ImportError:
            log.warning("--backend faiss: faiss is not installed (pip install faiss-cpu); using torch instead")
            return TorchTiles(rows, block, gemm)
        if rows.left.device.type != "cpu":
            log.warning("--backend faiss computes on the CPU here; the histograms stay on %s", rows.left.device)
        return FaissTiles(rows, block, binning)
    return TorchTiles(rows, block, gemm)
