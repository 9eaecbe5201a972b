"""Counting bin coordinates into histograms, and what a pass of the tile loop leaves (`TilePass`): on the CPU
(`BinCounts`, NumPy, one `ThreadCounts` per product thread, with the thread's extreme pair, exact tail and the
jackknife's group counts) and on a GPU (`Stager`, torch). Both put a value in the same bin: its coordinate
clipped to [0, bins-1] (the GPU's histc over [0, bins] is the same for every coordinate below bins) and truncated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.metrics.binning import Binning
from pipeline.metrics.intervals import COARSE
from pipeline.metrics.roc import HistogramROC
from pipeline.metrics.tail import Tail

if TYPE_CHECKING:
    import torch

COUNT_CHUNK = 1 << 20  # values per bincount call (at least 4x the bins): one reused 4-8 MB index buffer


class BinCounts:
    """Histogram counts on the CPU: bin coordinates clipped to [0, bins-1] (in float32) and truncated to integers
    in one pass, straight into one reused integer buffer (int32 for torch's bincount, intp for NumPy's, which
    copies any other input to intp; fresh buffers fault in new pages on every call), `bincount`-ed when the buffer
    is full (`flush`) so that each call's cost of `bins` is spread over at least 4 x bins values. One per thread:
    counts of several add up exactly.

    With `ids` (values' group-pair ids, 0..n_ids-1) it also counts `coarse` bins per id (`group_counts`, the
    jackknife's input, `pipeline.metrics.intervals`): at `flush`, the counted fine bins become keys in place."""

    def __init__(self, bins: int, n_ids: int = 0, coarse: int = 1):
        self.bins, self.n_ids, self.coarse = bins, n_ids, coarse
        self.top = np.float32(bins - 1)
        self.counts: np.ndarray | None = None  # the first bincount's output, then added to (no fresh zeros)
        self.group_counts: np.ndarray | None = None
        self.chunk = max(COUNT_CHUNK, 4 * bins)
        # torch's bincount takes int32 (half the memory traffic of staging and counting); NumPy's copies any
        # input but intp to intp
        itype = np.int32 if "torch" in sys.modules and max(bins, n_ids * coarse) < 2**31 else np.intp
        self.ibuf = np.empty(0, dtype=itype)  # grown to what is staged, up to `chunk`, then reused
        self.segments: list[tuple[int, int, object]] = []  # with group counts: (start, stop, ids) of staged values
        self.used = 0
        ratio = bins // coarse  # a power-of-two ratio: coarse bin = fine bin >> shift
        self.shift = ratio.bit_length() - 1 if bins % coarse == 0 and ratio & (ratio - 1) == 0 else None

    def add(self, values: np.ndarray, ids=None) -> None:
        """Count `values` (any shape; bin coordinates, clipped here) and, with group counts, per id: `ids` is one
        id for all, one per value (same shape), or for 2-D values a list of rectangles (r0, r1, c0, c1, id)."""
        if self.n_ids and ids is None:
            raise ValueError("group counts need the values' ids")
        flat = values.reshape(-1)  # a view: the tile loop hands contiguous values
        if isinstance(ids, list) and values.size > self.chunk:  # rectangles of a large input: one id per value
            per = np.empty(values.shape, dtype=self.ibuf.dtype)
            for r0, r1, c0, c1, i in ids:
                per[r0:r1, c0:c1] = i
            ids = per
        flat_ids = ids.reshape(-1) if isinstance(ids, np.ndarray) else None
        for s in range(0, flat.size, self.chunk):
            part = flat[s : s + self.chunk]
            if self.used + part.size > self.chunk:
                self.flush()
            self._reserve(self.used + part.size)
            fine = self.ibuf[self.used : self.used + part.size]
            np.clip(part, 0, self.top, out=fine, casting="unsafe")  # clipped in float32, truncated = floor (>= 0)
            if self.n_ids:  # the ids of these values, applied at `flush`
                if flat_ids is not None:
                    spec = flat_ids[s : s + self.chunk]
                elif isinstance(ids, list):  # the whole input is this part
                    spec = (values.shape, ids)
                else:
                    spec = int(ids)
                self.segments.append((self.used, self.used + part.size, spec))
            self.used += part.size

    def _reserve(self, size: int) -> None:
        """A buffer for `size` staged values (at most `chunk`): doubled while small, then `chunk` at once (each
        growth copies, and fresh memory costs page faults)."""
        if len(self.ibuf) >= min(size, self.chunk):
            return
        size = self.chunk if size > self.chunk // 8 else min(max(2 * len(self.ibuf), size), self.chunk)
        self.ibuf = _grown(self.ibuf, size, self.used)

    def flush(self) -> np.ndarray:
        """Count what is staged; returns the counts (int64, `bins`), and `group_counts` is set too."""
        if self.used:
            staged = self.ibuf[: self.used]
            self.counts = added(self.counts, _bincount(staged, self.bins))
            if self.n_ids:
                keys = self._keys(staged)
                self.group_counts = added(self.group_counts, _bincount(keys, self.n_ids * self.coarse))
            self.used = 0
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.int64)
        if self.group_counts is None:
            self.group_counts = np.zeros(self.n_ids * self.coarse, dtype=np.int64)
        return self.counts

    def _keys(self, staged: np.ndarray) -> np.ndarray:
        """The staged fine bins, counted already, turned in place into the jackknife's keys: id * coarse + coarse
        bin, as the GPU computes them (no second staging buffer)."""
        c = self.coarse
        if self.shift is not None:
            np.right_shift(staged, self.shift, out=staged)
        else:
            np.floor_divide(staged.astype(np.int64) * c, self.bins, out=staged, casting="unsafe")
        for a, b, spec in self.segments:
            key = staged[a:b]
            if isinstance(spec, np.ndarray):
                key += spec.astype(key.dtype, copy=False) * c  # widened first: ids may be int16
            elif isinstance(spec, tuple):  # rectangles of a 2-D input
                key2d = key.reshape(spec[0])
                for r0, r1, c0, c1, i in spec[1]:
                    key2d[r0:r1, c0:c1] += i * c
            else:
                key += spec * c
        self.segments = []
        return staged


def _bincount(idx: np.ndarray, minlength: int) -> np.ndarray:
    """`np.bincount`; torch's where torch is loaded already (the in-memory path): the same counts, and it lets
    the other product thread run meanwhile (NumPy's holds the GIL). Out-of-core scoring does not load torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return np.bincount(idx, minlength=minlength)
    return torch.bincount(torch.from_numpy(idx), minlength=minlength).numpy()


def added(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """`total + counts` in place (`counts` itself the first time)."""
    return counts.astype(np.int64, copy=False) if total is None else np.add(total, counts, out=total)


def _grown(buf: np.ndarray, size: int, keep: int) -> np.ndarray:
    new = np.empty(size, dtype=buf.dtype)
    new[:keep] = buf[:keep]
    return new


def as_int64(counts) -> np.ndarray:
    if not isinstance(counts, np.ndarray):  # a torch tensor of float64 counts (GPU)
        counts = counts.cpu().numpy().round()
    return counts.astype(np.int64, copy=False)


class Stager:
    """GPU counting: `torch.histc` over [0, bins] of clamped bin coordinates into float64 counts, batching small
    inputs into one call (each call has a fixed cost); the bin of a value does not depend on its batch."""

    def __init__(self, bins: int, device, size: int = 1 << 22):
        import torch

        self.torch = torch
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64, device=device)
        self.buf = torch.empty(size, dtype=torch.float32, device=device)
        self.used = 0

    def add(self, values: torch.Tensor) -> None:
        k = values.numel()
        if k == 0:
            return
        if k >= len(self.buf) // 16:
            self.counts += self.torch.histc(values, bins=self.bins, min=0, max=self.bins)
            return
        if self.used + k > len(self.buf):
            self.flush()
        self.buf[self.used : self.used + k] = values.reshape(-1)
        self.used += k

    def flush(self) -> torch.Tensor:
        if self.used:
            self.counts += self.torch.histc(self.buf[: self.used], bins=self.bins, min=0, max=self.bins)
            self.used = 0
        return self.counts


class ThreadCounts:
    """One thread's share of a CPU pass of the tile loop: its histograms, its extreme candidate (value, tile, i, j)
    with i, j in the source's row order, its exact tail, and the jackknife's counts per pair of identity groups
    (`pipeline.metrics.intervals`; in the same counters as the bins: one pass counts both)."""

    def __init__(self, bins: int, tail_k: int, metric: str, n_ids: int = 0, bound: float | None = None):
        self.all, self.pos = BinCounts(bins, n_ids, COARSE), BinCounts(bins, n_ids, COARSE)
        self.best: tuple = (float("nan"), -1, -1, -1)
        self.tail = Tail(tail_k, metric, bound) if tail_k else None
        self.seconds_products = self.seconds_counting = 0.0  # this thread's time in its blocks' products, counting


def group_totals(threads: list[ThreadCounts], size: int) -> list[np.ndarray]:
    """The threads' jackknife counts added up: all pairs, same-person pairs."""
    out = []
    for name in ("all", "pos"):
        total = None
        for c in threads:
            getattr(c, name).flush()
            total = added(total, getattr(c, name).group_counts)  # the threads' arrays are not used again
        out.append(np.zeros(size, np.int64) if total is None else total)
    return out


@dataclass
class TilePass:
    """What a pass over tiles leaves: the counts (per bin) and the extreme pair. Values are bin coordinates:
    bin k holds [k, k+1)."""

    binning: Binning
    all_counts: Any
    pos_counts: Any
    extreme: float = float("nan")
    """Largest squared distance (l2) or smallest cosine (cosine) seen, as a bin coordinate."""
    extreme_rows: tuple[int, int] = (-1, -1)
    """Store rows of the pair with the extreme value."""
    extreme_tile: int = -1
    """Plan index of the tile holding the extreme pair (ties go to the earliest tile, then the first pair)."""
    n_pairs: int = 0
    tail: Tail | None = None
    """The exact tail (`pipeline.metrics.tail`), when the loop keeps one."""
    groups: tuple | None = None
    """With the tail: the jackknife's coarse counts per pair of identity groups (`pipeline.metrics.intervals`): of the
    sampled pairs, of every same-person pair, of the sampled same-person pairs; and the rows per group."""
    seconds_products: float | None = None
    """CPU counting: seconds the tiles' products took, summed over the threads (None where not measured: a GPU's
    work is asynchronous)."""
    seconds_counting: float | None = None
    """CPU counting: seconds the counting of the products' values took (bins, same-person pairs, extreme pair,
    exact tail, group counts), summed over the threads."""

    def roc(self) -> HistogramROC:
        """The pass as a `HistogramROC`; it takes over the count arrays (fresh memory costs page faults)."""
        acc = HistogramROC.from_counts(self.binning, as_int64(self.all_counts), as_int64(self.pos_counts))
        acc.tail = self.tail
        if self.groups is not None:
            acc.groups = tuple(as_int64(c) for c in self.groups)
        return acc
