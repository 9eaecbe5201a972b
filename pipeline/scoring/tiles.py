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

import contextlib
import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.metrics.binning import Binning
from pipeline.metrics.intervals import COARSE, GROUPS
from pipeline.metrics.tail import Tail, exact_ties, start_bound
from pipeline.scoring.blockmath import (
    Tile,
    better_extreme,
    single_threaded_blas,
    take_product_seconds,
    wait_all,
)
from pipeline.scoring.counting import Stager, ThreadCounts, TilePass, added, as_int64, group_totals
from pipeline.scoring.tile_pairs import (
    Block,
    TilePart,
    block_values,
    clip_to_span,
    in_sorted,
    multiplied,
    pair_ids,
    pairs_in,
    runs,
    same_label_flat,
)

if TYPE_CHECKING:
    import torch

    from pipeline.scoring.sources import RowSource, RowStats

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

    `rows`: the source's statistics (`pipeline.scoring.sources.RowStats`: labels in label order, the map to
    store rows, duplicate rows, score offsets, identity groups). Counting: "numpy" (CPU), "torch" (the GPU's;
    also runs on the CPU), "auto" by `device`. `side`: the product side (`chunk_side(block)`), which a span's
    rows are rounded out to. `tail_k`: size of the exact tail (`pipeline.metrics.tail`; 0: none)."""

    def __init__(self, binning: Binning, product: Product, rows: RowStats, device: Any = "cpu",
                 counting: str = "auto", side: int = 1, tail_k: int = 0,
                 scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:  # fmt: skip
        self.binning, self.product, self.labels, self.side = binning, product, rows.labels, side
        self.scope = scope  # the product's own thread limits for a pass (FAISS's BLAS)
        self.metric, self.order, self.device, self.tail_k = binning.metric, rows.order, device, tail_k
        self.ties = exact_ties(binning, rows.dups, rows.offsets)
        # identity groups of the rows (the jackknife's intervals come with the exact tail)
        self.groups = rows.groups if tail_k else None
        on_cpu = getattr(device, "type", device) == "cpu"
        self.numpy = counting == "numpy" or (counting == "auto" and on_cpu)
        self._triu: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, Any]] = {}

    @classmethod
    def over(cls, source: RowSource, tiles: Any, binning: Binning, counting: str = "auto", side: int = 1,
             tail_k: int = 0) -> TileLoop:  # fmt: skip
        """The loop over a row source (`pipeline.scoring.sources`) whose tiles `tiles` multiplies (its `values`)."""
        return cls(binning, tiles.values, source.stats, source.device, counting, side, tail_k,
                   getattr(tiles, "scope", contextlib.nullcontext))  # fmt: skip

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
        self._threads: dict[int, ThreadCounts] = {}
        self._group_dev: dict[str, Any] = {}
        counts, extremes = None, None
        if self.numpy:
            res = TilePass(self.binning, None, None)
        else:
            counts = (Stager(self.binning.bins, self.device), Stager(self.binning.bins, self.device))
            res = TilePass(self.binning, counts[0].counts, counts[1].counts)
            import torch  # each tile's extreme stays on the device (no wait per tile); the pair is found at the end

            extremes = torch.full((len(indices),), math.nan, device=self.device)
        take_product_seconds()  # products before this pass (the bin-range sample) are not its tiles'
        with single_threaded_blas(), self.scope():  # the product threads' BLAS calls, queued ones too
            self._tiles(plan, indices, span, progress, res, counts, extremes)
        if self.numpy:
            self._gather(res)
            res.seconds_products += take_product_seconds()  # products of this thread not counted here (FAISS)
        else:
            counts[0].flush()
            counts[1].flush()
            if res.n_pairs:
                self._find_extreme(plan, indices, extremes, res)
        self._tail_and_groups(res)
        self._threads = {}
        return res

    def _tiles(self, plan: list[Tile], indices: Iterable[int], span: tuple[int, int] | None, progress: bool,
               res: TilePass, counts: tuple[Stager, Stager] | None, extremes: Any) -> None:  # fmt: skip
        """Count the selected tiles, on the CPU with up to `TILES_IN_FLIGHT` tiles' block jobs queued."""
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

    def _tail_and_groups(self, res: TilePass) -> None:
        """The threads' exact tails merged, and the jackknife's counts per pair of identity groups."""
        if self.tail_k:
            res.tail = Tail(self.tail_k, self.metric)
            for c in self._threads.values():
                res.tail.merge(c.tail)
            res.tail.finish()
        if self.groups is not None:
            size = GROUPS * GROUPS * COARSE
            if self.numpy:
                counts = group_totals(list(self._threads.values()), size)
            else:
                counts = [as_int64(self._group_dev[k]) if k in self._group_dev else np.zeros(size, np.int64)
                          for k in ("all", "pos")]  # fmt: skip
            res.groups = (*counts, np.bincount(self.groups, minlength=GROUPS))

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
        res.seconds_products = res.seconds_counting = 0.0
        best = (float("nan"), -1, -1, -1)
        for c in self._threads.values():  # added into the first thread's arrays (fresh memory costs page faults)
            res.all_counts = added(res.all_counts, c.all.flush())
            res.pos_counts = added(res.pos_counts, c.pos.flush())
            best = better_extreme(best, c.best, self.metric)
            res.seconds_products += c.seconds_products
            res.seconds_counting += c.seconds_counting
        if res.all_counts is None:
            res.all_counts, res.pos_counts = np.zeros(bins, dtype=np.int64), np.zeros(bins, dtype=np.int64)
        res.extreme, res.extreme_tile = best[0], best[1]
        res.extreme_rows = (self.store_row(best[2]), self.store_row(best[3])) if best[1] >= 0 else (-1, -1)

    def _counting(self) -> ThreadCounts:
        c = self._threads.get(threading.get_ident())
        if c is None:
            n_ids = 0 if self.groups is None else GROUPS * GROUPS
            b = self.binning
            c = self._threads[threading.get_ident()] = ThreadCounts(b.bins, self.tail_k, self.metric, n_ids,
                                                                    start_bound(b))  # fmt: skip
        return c

    def _tile_numpy(self, k: int, t: Tile, a: int, b: int) -> list[Future]:
        """Count the pairs of tile `t` whose row lies in [a, b), block by block as the row source computes them
        (in its worker threads, while each block is in cache), or from the whole product when it hands one.
        Returns the jobs still queued (the caller waits for them)."""
        a2, b2 = multiplied(t, a, b, self.side)
        w = t.c1 - t.c0
        pf = same_label_flat(self.labels, a, b, t, a2, w)
        # a pair (r, c) of the product needs c > r + below on a diagonal tile
        tile = TilePart(k, t, a - a2, b - a2, a2, a2 - t.r0 if t.diagonal else None, pf // w, pf % w)
        on_block = functools.partial(self._count_block, tile)
        jobs: list[Future] = []
        u = self.product(t, a2, b2, on_block, jobs)
        if u is not None:  # a source without blocks (FAISS): the whole product is one block
            on_block(0, b2 - a2, 0, w, u if isinstance(u, np.ndarray) else u.numpy())
        return jobs

    def _count_block(self, tile: TilePart, r0: int, r1: int, c0: int, c1: int, v: np.ndarray) -> None:
        """Count one block of a tile's product (rows r0..r1, columns c0..c1 of it, values `v`): its pairs, its
        extreme pair, its same-person pairs and, with the tail, its most similar pairs; and the time this took."""
        start = time.perf_counter()
        cnt = self._counting()
        cnt.seconds_products += take_product_seconds()
        self._count_values(cnt, tile, r0, r1, c0, c1, v)
        cnt.seconds_counting += time.perf_counter() - start

    def _count_values(self, cnt: ThreadCounts, tile: TilePart, r0: int, r1: int, c0: int, c1: int,
                      v: np.ndarray) -> None:  # fmt: skip
        lo, hi = max(r0, tile.lo), min(r1, tile.hi)  # rows of the span
        if tile.below is not None:
            hi = min(hi, c1 - 1 - tile.below)  # rows with a column above the diagonal
        if hi <= lo:
            return
        blk = Block(tile.a2 + r0, tile.t.c0 + c0, c1 - c0, lo - r0)
        vals, flat = block_values(v, r0, c0, blk.width, lo, hi, tile.below)
        if not vals.size:
            return
        gr = gc = None
        if self.groups is not None:  # the identity groups of the rows and columns (the jackknife's)
            gr, gc = self.groups[tile.a2 + lo : tile.a2 + hi], self.groups[blk.j0 : blk.j0 + blk.width]
        j = int(self.metric.least_similar_at(vals))
        f = j + blk.skip * blk.width if flat is None else int(flat[j])
        cnt.best = better_extreme(cnt.best, (float(vals.reshape(-1)[j]), tile.k, *blk.pair(f)), self.metric)
        if gr is None:
            cnt.all.add(vals)
        elif flat is None:  # rows sorted by label: groups in runs, one id per rectangle of runs
            cnt.all.add(vals, [(rs, re_, cs, ce, int(gr[rs]) * GROUPS + int(gc[cs])) for rs, re_ in runs(gr)
                               for cs, ce in runs(gc)])  # fmt: skip
        else:
            cnt.all.add(vals, pair_ids(flat, blk.width, blk.skip, gr, gc))
        pflat, pvals, pids = self._positives(tile, blk, lo, hi, r0, c0, v)
        if pvals.size:
            cnt.pos.add(pvals, pids)
        if cnt.tail is not None:
            self._tail_block(cnt.tail, blk, vals, flat, (pflat, pvals, pids), gr, gc)

    def _positives(self, tile: TilePart, blk: Block, lo: int, hi: int, r0: int, c0: int,
                   v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
        """(flat positions, values, group-pair ids) of the block's same-person pairs of rows [lo, hi)."""
        s0, s1 = np.searchsorted(tile.pos_r, [lo, hi])
        if s1 > s0:
            pr, pc = tile.pos_r[s0:s1], tile.pos_c[s0:s1]
            keep = (pc >= c0) & (pc < c0 + blk.width)
            if keep.any():
                pflat = (pr[keep] - r0) * blk.width + (pc[keep] - c0)
                pids = None if self.groups is None else self.groups[tile.a2 + pr[keep]] * (GROUPS + 1)  # one group
                return pflat, v.reshape(-1)[pflat], pids
        return _NONE, _NO_VALUES, None

    def _tail_block(self, tail: Tail, blk: Block, vals: np.ndarray, flat: np.ndarray | None,
                    positives: tuple, gr: np.ndarray | None, gc: np.ndarray | None) -> None:  # fmt: skip
        """The exact tail: the block's values at least as similar as its bound, positives apart."""
        pflat, pvals, pids = positives
        if pvals.size:
            pvals = self.ties(pvals, *blk.pair(pflat))
        near = np.flatnonzero(tail.candidates(vals))
        pk = tail.candidates(pvals)
        pk_ids = None if pids is None else pids[pk]
        if near.size:
            at = near + blk.skip * blk.width if flat is None else flat[near]
            negative = ~in_sorted(at, pflat)
            nids = None if gr is None else pair_ids(at[negative], blk.width, blk.skip, gr, gc)
            at = at[negative]
            nv = self.ties(vals.reshape(-1)[near][negative], *blk.pair(at))
            tail.add(nv, pvals[pk], nids, pk_ids)
        elif pvals.size:
            tail.add(_NO_VALUES, pvals[pk], None, pk_ids)

    def _upper_values(self, t: Tile, values: torch.Tensor) -> torch.Tensor:
        if not t.diagonal:
            return values.reshape(-1)
        return values.reshape(-1).index_select(0, self.triu(t.r1 - t.r0)[3])

    def _tile_torch(self, t: Tile, all_c: Stager, pos_c: Stager) -> torch.Tensor:
        """Count a tile's pairs; returns its extreme value as a 0-d tensor on the device."""
        import torch

        tv = self.product(t, t.r0, t.r1)
        vals = self._upper_values(t, tv)
        ext = self.metric.least_similar(vals)
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
        top, at = torch.topk(vals, k, largest=not self.metric.low_is_similar, sorted=False)
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
        m = self.metric
        filled = extremes.nan_to_num(-m.unbounded)  # a tile without pairs: never the least similar
        k = int(m.least_similar_at(filled))  # the first occurrence
        t = plan[indices[k]]
        vals = self._upper_values(t, self.product(t, t.r0, t.r1))
        res.extreme = float(m.least_similar(vals))
        p = int(m.least_similar_at(vals))
        if t.diagonal:
            r, c, _, _ = self.triu(t.r1 - t.r0)
            r, c = int(r[p]), int(c[p])
        else:
            r, c = divmod(p, t.c1 - t.c0)
        res.extreme_rows = (self.store_row(t.r0 + r), self.store_row(t.c0 + c))
        res.extreme_tile = indices[k]


__all__ = ["TilePass", "TileLoop"]
