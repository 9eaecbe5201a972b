"""The one loop over tiles of all-pairs scoring, whatever holds the rows.

Every all-pairs path goes through `TileLoop.run`: rows held in memory (`pipeline.scoring.stage`, also each torchrun
rank with its share of the plan) and rows read from the store in blocks (`pipeline.scoring.rows`, `--rows A:B` and
out-of-core scoring, a span of rows). A row source computes each tile's product (rows [a2, b2) of tile `t`
against its columns, in bin coordinates) and hands it over block by block (`pipeline.scoring.blockmath.fixed_matmul`,
in its worker threads, while each block is in cache) or whole (FAISS, GPU). For each block the loop takes the
tile's pairs (`pipeline.scoring.tile_pairs`: the rows of the span, the upper triangle of a diagonal tile), keeps the
extreme pair, counts every pair and the same-person pairs (matched by label) into two histograms
(`pipeline.scoring.counting`), and, for the biometric report, the exact tail (`pipeline.metrics.tail`) and the coarse counts
per pair of identity groups (`pipeline.metrics.intervals`). CPU: NumPy counting per thread; GPU: torch counting, a
branch of the same loop, not a second one. Torch is imported only for the latter.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.metrics.intervals import COARSE, GROUPS, identity_groups
from pipeline.metrics.roc import Binning
from pipeline.metrics.tail import ExactTies, Tail, start_bound, zero_coordinate
from pipeline.scoring.blockmath import Tile, better_extreme, wait_all
from pipeline.scoring.counting import Stager, ThreadCounts, TilePass, added, as_int64, group_totals
from pipeline.scoring.tile_pairs import (
    clip_to_span,
    in_sorted,
    multiplied,
    pair_ids,
    pairs_in,
    ranges,
    runs,
    same_label_flat,
)

if TYPE_CHECKING:
    import torch

Product = Callable[..., Any]
"""product(t, a2, b2, on_block=None, pending=None): rows [a2, b2) of tile t against its columns c0..c1
([b2-a2, c1-c0], float32 bin coordinates). With `on_block` a source that computes blocks
(`pipeline.scoring.blockmath.fixed_matmul`) hands each block to it (rows and columns relative to a2 and c0) and returns
None, its block jobs still queued where it appended them to `pending`; otherwise it returns the whole product, a
NumPy array or a torch tensor."""


TILES_IN_FLIGHT = 2  # CPU: tiles whose block jobs may be queued at once (their rows stay in memory meanwhile)
_NONE = np.zeros(0, dtype=np.int64)
_NO_VALUES = np.zeros(0, dtype=np.float32)


class TileLoop:
    """Scores tiles of a plan from one row source into a `TilePass`.

    `labels` are the source's labels in its row order; `order` maps a source row to its store row (None: the
    same). Counting: "numpy" (CPU), "torch" (the GPU's; also runs on the CPU), "auto" by `device`. `side`: the
    product side (`chunk_side(block)`), which a span's rows are rounded out to. `tail_k`: size of the exact
    tail (`pipeline.metrics.tail`; 0: none)."""

    def __init__(self, binning: Binning, product: Product, labels: np.ndarray, metric: str,
                 order: np.ndarray | None = None, device: Any = "cpu", counting: str = "auto",
                 side: int = 1, tail_k: int = 0, ties: ExactTies | None = None) -> None:  # fmt: skip
        self.binning, self.product, self.labels, self.metric, self.side = binning, product, labels, metric, side
        self.order, self.device, self.tail_k = order, device, tail_k
        self.ties = ties or ExactTies(None, zero_coordinate(binning.lo, binning.hi, binning.bins, metric), metric)
        # identity groups of the rows (the jackknife's intervals come with the exact tail)
        self.groups = identity_groups(labels) if tail_k else None
        on_cpu = getattr(device, "type", device) == "cpu"
        self.numpy = counting == "numpy" or (counting == "auto" and on_cpu)
        self._triu: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, Any]] = {}

    def store_row(self, i: int) -> int:
        return int(i) if self.order is None else int(self.order[i])

    def triu(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """Upper triangle of an m x m tile: rows, columns, flat indices (numpy; device tensor for torch)."""
        if m not in self._triu:
            r, c = np.triu_indices(m, 1)
            flat = r * m + c
            dev = None
            if not self.numpy:
                import torch

                dev = torch.from_numpy(flat).to(self.device)
            self._triu[m] = (r, c, flat, dev)
        return self._triu[m]

    def run(self, plan: list[Tile], select: Iterable[int] | None = None, span: tuple[int, int] | None = None,
            progress: bool = True) -> TilePass:  # fmt: skip
        """Score the tiles `plan[i]` for i in `select` (default: all), only the pairs of rows in `span`."""
        indices = range(len(plan)) if select is None else list(select)
        if span is not None and not self.numpy:
            raise ValueError("a span of rows is scored with NumPy counting (out of core, on the CPU)")
        bins = self.binning.bins
        extremes = None
        self._threads: dict[int, ThreadCounts] = {}
        self._group_dev: dict[str, Any] = {}
        if self.numpy:
            res = TilePass(self.binning, None, None)
        else:
            counts = (Stager(bins, self.device), Stager(bins, self.device))
            res = TilePass(self.binning, counts[0].counts, counts[1].counts)
            import torch  # each tile's extreme stays on the device (no wait per tile); the pair is found at the end

            extremes = torch.full((len(indices),), math.nan, device=self.device)
        total = sum(pairs_in(plan[i], span) for i in indices)
        queued: deque[tuple[int, list]] = deque()  # CPU: (pairs, block jobs) of the tiles in flight
        with tqdm(total=total, unit="pair", unit_scale=True, disable=not progress, mininterval=1.0,
                  desc="scoring pairs") as bar:  # fmt: skip
            try:
                for k, i in enumerate(indices):
                    t = plan[i]
                    a, b = clip_to_span(t, span)
                    if b <= a or not t.n_pairs:
                        continue
                    if self.numpy:
                        queued.append((pairs_in(t, span), self._tile_numpy(i, t, a, b)))
                        while len(queued) > TILES_IN_FLIGHT:
                            res.n_pairs += self._finish(queued.popleft(), bar)
                    else:
                        extremes[k] = self._tile_torch(t, *counts)
                        res.n_pairs += t.n_pairs
                        bar.update(t.n_pairs)
                while queued:
                    res.n_pairs += self._finish(queued.popleft(), bar)
            finally:  # on an error, no block job is left running
                wait([f for _, jobs in queued for f in jobs])
        if self.numpy:
            self._gather(res)
        else:
            counts[0].flush()
            counts[1].flush()
            if res.n_pairs:
                self._find_extreme(plan, indices, extremes, res)
        if self.tail_k:
            res.tail = Tail(self.tail_k, self.metric)
            for c in self._threads.values():
                res.tail.merge(c.tail)
            res.tail.finish()
        if self.groups is not None:
            size = GROUPS * GROUPS * COARSE
            names = ("all", "pos")
            if self.numpy:
                counts = group_totals(list(self._threads.values()), size)
            else:
                counts = [as_int64(self._group_dev[k]) if k in self._group_dev else np.zeros(size, np.int64)
                          for k in names]  # fmt: skip
            res.groups = (*counts, np.bincount(self.groups, minlength=GROUPS))
        self._threads = {}
        return res

    @staticmethod
    def _finish(queued: tuple[int, list], bar: tqdm) -> int:
        pairs, jobs = queued
        wait_all(jobs)
        bar.update(pairs)
        return pairs

    def _gather(self, res: TilePass) -> None:
        """The threads' counts added up, their extreme candidates reduced (ties: the earliest tile, then pair)."""
        bins = self.binning.bins
        res.all_counts = res.pos_counts = None
        best = (float("nan"), -1, -1, -1)
        for c in self._threads.values():  # added into the first thread's arrays (fresh memory costs page faults)
            res.all_counts = added(res.all_counts, c.all.flush())
            res.pos_counts = added(res.pos_counts, c.pos.flush())
            best = better_extreme(best, c.best, self.metric)
        if res.all_counts is None:
            res.all_counts, res.pos_counts = np.zeros(bins, dtype=np.int64), np.zeros(bins, dtype=np.int64)
        res.extreme, res.extreme_tile = best[0], best[1]
        res.extreme_rows = (self.store_row(best[2]), self.store_row(best[3])) if best[1] >= 0 else (-1, -1)

    def _counting(self) -> ThreadCounts:
        c = self._threads.get(threading.get_ident())
        if c is None:
            n_ids = 0 if self.groups is None else GROUPS * GROUPS
            b = self.binning
            bound = start_bound(b.near, b.lo, b.hi, b.bins, self.metric)
            c = self._threads[threading.get_ident()] = ThreadCounts(b.bins, self.tail_k, self.metric, n_ids, bound)
        return c

    def _tile_numpy(self, k: int, t: Tile, a: int, b: int) -> list[Future]:
        """Count the pairs of tile `t` whose row lies in [a, b), block by block as the row source computes them
        (in its worker threads, while each block is in cache), or from the whole product when it hands one.
        Returns the jobs still queued (the caller waits for them)."""
        a2, b2 = multiplied(t, a, b, self.side)
        below = a2 - t.r0 if t.diagonal else None  # a pair (r, c) of the product needs c > r + below
        pf = same_label_flat(self.labels, a, b, t, a2, t.c1 - t.c0)
        w = t.c1 - t.c0
        pos_r, pos_c = pf // w, pf % w  # same-person pairs: sorted by row, then column

        def on_block(r0: int, r1: int, c0: int, c1: int, v: np.ndarray) -> None:
            lo, hi = max(r0, a - a2), min(r1, b - a2)  # rows of the span
            if below is not None:
                hi = min(hi, c1 - 1 - below)  # rows with a column above the diagonal
            if hi <= lo:
                return
            cnt = self._counting()
            width = c1 - c0
            if below is None or c0 > hi - 1 + below:  # every column of these rows
                vals = v[lo - r0 : hi - r0]
                flat = None
            else:  # a triangle: columns c > r + below
                rows = np.arange(lo, hi)
                flat = ranges(rows - r0, np.maximum(rows + below + 1, c0) - c0, np.full(len(rows), width), width)
                vals = v.reshape(-1).take(flat)
            if not vals.size:
                return
            gr = gc = None
            if self.groups is not None:  # the identity groups of the rows and columns (the jackknife's)
                gr, gc = self.groups[a2 + lo : a2 + hi], self.groups[t.c0 + c0 : t.c0 + c1]
            j = int(vals.argmax() if self.metric == "l2" else vals.argmin())
            f = j + (lo - r0) * width if flat is None else int(flat[j])
            cnt.best = better_extreme(cnt.best, (float(vals.reshape(-1)[j]), k, a2 + r0 + f // width,
                                                 t.c0 + c0 + f % width), self.metric)  # fmt: skip
            if gr is None:
                cnt.all.add(vals)
            elif flat is None:  # rows sorted by label: groups in runs, one id per rectangle of runs
                cnt.all.add(vals, [(rs, re_, cs, ce, int(gr[rs]) * GROUPS + int(gc[cs])) for rs, re_ in runs(gr)
                                   for cs, ce in runs(gc)])  # fmt: skip
            else:
                cnt.all.add(vals, pair_ids(flat, width, lo - r0, gr, gc))
            s0, s1 = np.searchsorted(pos_r, [lo, hi])
            pflat, pvals, pids = _NONE, _NO_VALUES, None
            if s1 > s0:
                pr, pc = pos_r[s0:s1], pos_c[s0:s1]
                keep = (pc >= c0) & (pc < c1)
                if keep.any():
                    pflat = (pr[keep] - r0) * width + (pc[keep] - c0)
                    pvals = v.reshape(-1)[pflat]
                    if self.groups is not None:
                        pids = self.groups[a2 + pr[keep]] * (GROUPS + 1)  # a same-person pair: one group
                    cnt.pos.add(pvals, pids)
            if cnt.tail is not None:  # the exact tail: values at least as similar as its bound, positives apart
                if pvals.size:
                    pvals = self.ties(pvals, a2 + r0 + pflat // width, t.c0 + c0 + pflat % width)
                near = np.flatnonzero(cnt.tail.candidates(vals))
                pk = cnt.tail.candidates(pvals)
                pk_ids = None if pids is None else pids[pk]
                if near.size:
                    at = near + (lo - r0) * width if flat is None else flat[near]
                    negative = ~in_sorted(at, pflat)
                    nids = None if gr is None else pair_ids(at[negative], width, lo - r0, gr, gc)
                    at = at[negative]
                    nv = self.ties(vals.reshape(-1)[near][negative], a2 + r0 + at // width, t.c0 + c0 + at % width)
                    cnt.tail.add(nv, pvals[pk], nids, pk_ids)
                elif pvals.size:
                    cnt.tail.add(_NO_VALUES, pvals[pk], None, pk_ids)

        jobs: list[Future] = []
        u = self.product(t, a2, b2, on_block, jobs)
        if u is not None:  # a source without blocks (FAISS): the whole product is one block
            on_block(0, b2 - a2, 0, w, u if isinstance(u, np.ndarray) else u.numpy())
        return jobs

    def _upper_values(self, t: Tile, values: torch.Tensor) -> torch.Tensor:
        if not t.diagonal:
            return values.reshape(-1)
        return values.reshape(-1).index_select(0, self.triu(t.r1 - t.r0)[3])

    def _tile_torch(self, t: Tile, all_c: Stager, pos_c: Stager) -> torch.Tensor:
        """Count a tile's pairs; returns its extreme value as a 0-d tensor on the device."""
        import torch

        tv = self.product(t, t.r0, t.r1)
        vals = self._upper_values(t, tv)
        ext = vals.max() if self.metric == "l2" else vals.min()
        pf = same_label_flat(self.labels, t.r0, t.r1, t, t.r0, t.c1 - t.c0)
        ids = None
        if self.groups is not None:
            g = torch.from_numpy(self.groups).to(tv.device)
            ids = self._upper_values(t, (g[t.r0 : t.r1] * GROUPS)[:, None] + g[t.c0 : t.c1][None, :])
        if self.tail_k:
            self._tail_torch(t, tv, vals, pf, ids)
        vals.clamp_(0, self.binning.bins)  # in the tile itself for off-diagonal tiles
        all_c.add(vals)
        w = t.c1 - t.c0
        if ids is not None:
            self._group_torch("all", vals, ids)
        if pf.size:
            pv = tv.reshape(-1).index_select(0, torch.from_numpy(pf).to(tv.device)).clamp(0, self.binning.bins)
            pos_c.add(pv)
            if ids is not None:
                pr = t.r0 + pf // w
                self._group_torch("pos", pv, torch.from_numpy(self.groups[pr] * (GROUPS + 1)).to(tv.device))
        return ext

    def _group_torch(self, which: str, vals: torch.Tensor, ids: torch.Tensor) -> None:
        """Coarse counts per group pair on the device, binned as `BinCounts` bins them on the CPU."""
        import torch

        fine = vals.clamp(0, self.binning.bins - 1).long()  # truncation, as on the CPU
        key = ids.long() * COARSE + fine * COARSE // self.binning.bins
        counts = torch.bincount(key, minlength=GROUPS * GROUPS * COARSE)
        self._group_dev[which] = counts if which not in self._group_dev else self._group_dev[which] + counts

    def _tail_torch(self, t: Tile, tv: torch.Tensor, vals: torch.Tensor, pf: np.ndarray, ids) -> None:
        """The tile's most similar values (as many as the tail and its positives could take) to the CPU tail."""
        import torch

        k = min(vals.numel(), self.tail_k + len(pf))
        top, at = torch.topk(vals, k, largest=self.metric != "l2", sorted=False)
        flat = at if not t.diagonal else self.triu(t.r1 - t.r0)[3].index_select(0, at)
        nids = None if ids is None else ids.index_select(0, at).cpu().numpy()
        top, flat = top.cpu().numpy(), flat.cpu().numpy()
        positive = np.isin(flat, pf)
        tail = self._counting().tail
        pos = tv.reshape(-1).index_select(0, torch.from_numpy(pf).to(tv.device)).cpu().numpy()
        w = t.c1 - t.c0
        pids = None if ids is None else self.groups[t.r0 + pf // w] * (GROUPS + 1)
        pos = self.ties(pos, t.r0 + pf // w, t.c0 + pf % w)
        neg_at = flat[~positive]
        neg = self.ties(top[~positive], t.r0 + neg_at // w, t.c0 + neg_at % w)
        pk = tail.candidates(pos)
        tail.add(neg, pos[pk], None if nids is None else nids[~positive], None if pids is None else pids[pk])

    def _find_extreme(self, plan: list[Tile], indices: list[int], extremes, res: TilePass) -> None:
        """The extreme pair from the per-tile extremes: the first tile holding it, the first pair in that tile
        (as the CPU's sequential scan finds it); that tile's values are computed once more."""
        find_max = self.metric == "l2"
        filled = extremes.nan_to_num(-math.inf if find_max else math.inf)
        k = int(filled.argmax() if find_max else filled.argmin())  # the first occurrence
        t = plan[indices[k]]
        vals = self._upper_values(t, self.product(t, t.r0, t.r1))
        res.extreme = float(vals.max() if find_max else vals.min())
        p = int(vals.argmax() if find_max else vals.argmin())
        if t.diagonal:
            r, c, _, _ = self.triu(t.r1 - t.r0)
            r, c = int(r[p]), int(c[p])
        else:
            r, c = divmod(p, t.c1 - t.c0)
        res.extreme_rows = (self.store_row(t.r0 + r), self.store_row(t.c0 + c))
        res.extreme_tile = indices[k]


__all__ = ["TilePass", "TileLoop"]
