"""Out-of-core all-pairs scoring of a row range (`score --all-pairs --rows A:B`), without torch.

Scores the pairs i < j whose smaller index i lies in [A, B), with rows counted in label order (the store's own
order for stores `embed` writes, which are sorted by label), reading the rows in blocks, so a store larger than
memory scores in bounded memory. The rows are those the in-memory `score` multiplies, in the same order
(`pipeline.scoring.sorted_rows`: a store in another row order is first copied in label order to a temporary file), with
the same tile plan, bins, row transforms and products (`pipeline.scoring.blockmath`): a whole run, and the parts of any
split of [0, N) added up by `cli.py merge`, give the in-memory results bit for bit. Every part draws the
bin-range sample from the whole store with the same seed, so all parts share their bins.

Memory: two row blocks and a few bytes of labels per row, whatever the size of the store (docs/design.md).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.roc import Binning, HistogramROC
from pipeline.metrics.tail import duplicate_ids, exact_ties, start_rank, tail_size
from pipeline.outputs import claim
from pipeline.report.results import (
    PART_FILE,
    RESULT_FILES,
    check_results_out,
    json_attrs,
)
from pipeline.scoring.blockmath import (
    LEAF,
    STAT_ROWS,
    SampleRange,
    Tile,
    augment,
    bin_range,
    blocked_mean,
    chunk_side,
    fixed_matmul,
    operand_width,
    pair_distance,
    sample_rows,
    scale_right,
    tile_plan,
)
from pipeline.scoring.merge import write_part
from pipeline.scoring.sorted_rows import LabelOrder
from pipeline.scoring.tiles import TileLoop
from pipeline.store.layout import Store, bad_rows_error, open_store, recorded_data_root

log = logging.getLogger(__name__)


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


def parse_rows(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B (B is checked against the store later)."""
    a, sep, b = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        start, stop = int(a), int(b)
    except ValueError:
        raise ValueError(f"--rows must be A:B (two integers, e.g. 0:2000), not {text!r}") from None
    if start < 0 or stop <= start:
        raise ValueError(f"--rows {text}: need 0 <= A < B")
    return start, stop


@dataclass(frozen=True)
class RowsConfig:
    """Configuration of out-of-core scoring of the pairs whose smaller row index lies in `rows`."""

    store: Path
    """The HDF5 embedding store (/embeddings, /labels in any row order)."""
    rows: tuple[int, int] | None = None
    """[A, B): score the pairs i < j with A <= i < B; None: every pair."""
    out: Path | None = None
    """Part folder: part.json and histogram.npz (plus the full results when the part covers every row)."""
    metric: str = "l2"
    """l2 or cosine, as `score`."""
    bins: int = 1 << 18
    """Histogram bins (every part of one merge needs the same)."""
    block: int = 4096
    """Rows per tile side (every part of one merge needs the same)."""
    seed: int = 0
    """Seed of the bin-range sample (every part of one merge needs the same)."""
    sample_pairs: int = 1 << 18
    """About this many pairs set the bin range."""
    overwrite: bool = False
    """Replace an existing folder."""
    progress: bool = True
    """Show a progress bar."""
    label: str | None = None
    """Name of the result in legends and tables."""
    variant: str | None = None
    """pretrained or finetuned (default: guessed from the store's weights attribute)."""
    log_fpr: bool = False
    """Logarithmic false-positive-rate axis in roc.png (complete results)."""
    score_norm: bool = True
    """Subtract the store's score offsets (cohort normalisation), as `score` does; False: plain scores."""

    def __post_init__(self):
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"--metric must be l2 or cosine, not {self.metric!r}")
        if not 2 <= self.bins <= 1 << 24:
            raise ValueError(f"--bins must be between 2 and {1 << 24}, not {self.bins}")
        if not 1 <= self.block <= 4096:
            raise ValueError(f"--block must be between 1 and 4096, not {self.block}")
        if self.rows is not None and not 0 <= self.rows[0] < self.rows[1]:
            raise ValueError(f"--rows must satisfy 0 <= A < B, not {self.rows}")
        if self.variant not in (None, "pretrained", "finetuned"):
            raise ValueError(f"variant must be pretrained or finetuned, not {self.variant!r}")


class BlockRows:
    """Transformed row blocks `[k*T, (k+1)*T)` read from the store on demand (the last two kept); `offsets`: the
    score offsets in label order, or None."""

    def __init__(self, src: LabelOrder, mean: np.ndarray | None, metric: str, binning: Binning | None, side: int,
                 offsets: np.ndarray | None = None):  # fmt: skip
        self.src, self.mean, self.metric, self.binning, self.side = src, mean, metric, binning, side
        self.offsets = offsets
        self.width = operand_width(src.dim, metric, offsets is not None)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) of rows [a, b), transformed as `pipeline.scoring.stage.prepare` does, scaled to bins when a
        binning is set."""
        left = np.empty((b - a, self.width), dtype=np.float32)
        right = np.empty_like(left)
        for s in range(a, b, STAT_ROWS):  # STAT_ROWS-aligned pieces, as prepare transforms them
            e = min(b, (s // STAT_ROWS + 1) * STAT_ROWS)
            o = None if self.offsets is None else self.offsets[s:e]
            augment(self.src.rows(s, e), self.mean, self.metric, left[s - a : e - a], right[s - a : e - a], o)
        if self.binning is not None:
            b_ = self.binning
            scale_right(right, b_.lo, b_.hi, b_.bins)
        return left, right

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(min(self.cache))
            self.cache[k] = self.rows(k * self.side, min((k + 1) * self.side, self.src.n))
        return self.cache[k]


def row_stats(
    src: LabelOrder, metric: str, offsets: np.ndarray | None = None
) -> tuple[np.ndarray | None, float, np.ndarray | None]:
    """(centring mean or None, largest centred norm, duplicate ids as `pipeline.metrics.tail.duplicate_ids`) by streaming
    the rows in label order; NaN/inf or (cosine) zero rows are an error naming them (by store row)."""
    n, store = src.n, src.store
    bad: list[int] = []

    def blocks():
        for s in range(0, n, STAT_ROWS):
            blk = src.rows(s, min(s + STAT_ROWS, n))
            ok = np.isfinite(blk).all(axis=1)
            if not ok.all():
                bad.extend((np.flatnonzero(~ok) + s).tolist())
            yield blk

    mean = blocked_mean(blocks(), n) if metric == "l2" else None
    if metric == "cosine":
        for _ in blocks():
            pass
    if bad:
        raise bad_rows_error(store, sorted(src.store_rows(bad).tolist()))
    reader = BlockRows(src, mean, metric, None, STAT_ROWS, offsets)
    zero, sq = [], np.empty(n, dtype=np.float64)
    for s in range(0, n, STAT_ROWS):
        e = min(s + STAT_ROWS, n)
        left = np.empty((e - s, reader.width), dtype=np.float32)
        o = None if offsets is None else offsets[s:e]
        sq[s:e] = augment(src.rows(s, e), mean, metric, left, np.empty_like(left), o)
        zero.extend(src.store_rows(np.flatnonzero(sq[s:e] == 0) + s).tolist())
    if metric == "cosine" and zero:
        raise PipelineError(
            f"{store.path}: {len(zero)} rows are all zeros (rows {sorted(zero)[:10]}): their cosine is undefined. "
            f"Use --metric l2."
        )
    dups = duplicate_ids(sq, lambda i: src.rows(i, i + 1)[0])
    return mean, math.sqrt(float(sq.max())) if metric == "l2" else 1.0, dups


def positives(sorted_labels: np.ndarray) -> int:
    """Same-person pairs of labels sorted by label."""
    sizes = np.diff(np.flatnonzero(np.r_[True, np.diff(sorted_labels) != 0, True]))
    return int((sizes * (sizes - 1) // 2).sum())


def stream_binning(src: LabelOrder, mean, metric: str, max_norm: float, cfg: RowsConfig,
                   offsets: np.ndarray | None = None) -> Binning:  # fmt: skip
    """`pipeline.scoring.memory.choose_binning` over streamed column blocks (the same sample, products and
    range)."""
    rows = sample_rows(src.n, cfg.seed, cfg.sample_pairs)
    n_pairs = src.n * (src.n - 1) // 2
    keep = start_rank(tail_size(n_pairs, positives(src.labels)), n_pairs, len(rows) * (src.n - 1))
    reader = BlockRows(src, mean, metric, None, STAT_ROWS, offsets)
    sample_left = np.empty((len(rows), reader.width), dtype=np.float32)
    o = None if offsets is None else offsets[rows]
    augment(src.take(rows), mean, metric, sample_left, np.empty_like(sample_left), o)
    rng = SampleRange(rows, src.n, keep)
    for s in range(0, src.n, STAT_ROWS):
        _, right = reader.rows(s, min(s + STAT_ROWS, src.n))
        rng.add(sample_left, right, s)
    vmin, vmax = rng.extremes()
    span = None if offsets is None else (float(offsets.min()), float(offsets.max()))
    lo, hi = bin_range(vmin, vmax, metric, max_norm, span)
    return Binning(lo, hi, cfg.bins, metric, rng.near(metric))


@dataclass
class PartResult:
    acc: HistogramROC
    n_pairs: int
    extreme: tuple  # (value, tile, i, j)
    seconds: float


def score_part(src: LabelOrder, cfg: RowsConfig, binning: Binning, mean, rows: tuple[int, int],
               dups: np.ndarray | None = None, offsets: np.ndarray | None = None) -> PartResult:  # fmt: skip
    """Count the pairs i < j (label order) with i in `rows` into a HistogramROC: the tile loop over row blocks
    read in label order."""
    t0 = time.perf_counter()
    n, (A, B) = src.n, rows
    plan = tile_plan(n, cfg.block, LEAF)
    mine = [k for k, t in enumerate(plan) if t.r0 < B and t.r1 > A and t.n_pairs]
    side = min(cfg.block, n)
    reader = BlockRows(src, mean, cfg.metric, binning, side, offsets)
    unit = chunk_side(cfg.block)

    def product(t: Tile, a2: int, b2: int, on_block, pending=None) -> None:
        kr, kc = t.r0 // side, t.c0 // side
        left = reader.block(kr)[0][a2 - kr * side : b2 - kr * side]
        right = reader.block(kc)[1][t.c0 - kc * side : t.c1 - kc * side]
        return fixed_matmul(left, right, None, side=unit, below=a2 - t.r0 if t.diagonal else None, on_block=on_block,
                            pending=pending)  # fmt: skip

    k = tail_size(n * (n - 1) // 2, positives(src.labels))
    res = TileLoop(
        binning,
        product,
        src.labels,
        cfg.metric,
        src.order,
        counting="numpy",
        side=unit,
        tail_k=k,
        ties=exact_ties(binning, dups, offsets),
    ).run(plan, select=mine, span=(A, B), progress=cfg.progress)
    extreme = (res.extreme, res.extreme_tile, *res.extreme_rows)
    return PartResult(res.roc(), res.n_pairs, extreme, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- stage


def part_info(store: Store, cfg: RowsConfig, binning: Binning, rows: tuple[int, int], res: PartResult) -> dict:
    """What `merge` checks and adds: the part's place, bins, settings and store identity."""
    value, tile, i, j = res.extreme
    attrs = json_attrs(store.attrs)
    return {
        "rows": list(rows),
        "store": str(Path(cfg.store).resolve()),
        "store_n": store.n,
        "store_dim": store.dim,
        "store_size": os.path.getsize(cfg.store),
        "metric": cfg.metric,
        "score_norm": None if store.score_offsets(cfg.metric, cfg.score_norm) is None else store.score_norm,
        "bins": cfg.bins,
        "bin_lo": binning.lo,
        "bin_hi": binning.hi,
        "block": cfg.block,
        "leaf": LEAF,
        "seed": cfg.seed,
        "sample_pairs": cfg.sample_pairs,
        "n_pairs": res.n_pairs,
        "n_positive": res.acc.n_positive,
        "extreme": [value, tile, i, j],
        "max_distance": res.acc.max_distance,
        "seconds": res.seconds,
        "n_tiles": len(tile_plan(store.n, cfg.block, LEAF)),
        "label": cfg.label,
        "variant": cfg.variant,
        "provenance": attrs,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }


def score_rows(cfg: RowsConfig) -> dict:
    """Score the pairs of `cfg.rows` out of core; write the part folder; return its part.json dict (with the
    full metrics under "metrics" when the part covers every row)."""
    if cfg.out is None:
        return _score_rows(cfg)
    out, inputs, data_root = Path(cfg.out), [Path(cfg.store)], recorded_data_root(cfg.store)
    with claim(out, lambda: check_results_out(out, cfg.overwrite, inputs, data_root), RESULT_FILES):
        return _score_rows(cfg)


def _score_rows(cfg: RowsConfig) -> dict:
    with open_store(cfg.store, need_labels=True) as store:
        n = store.n
        if n < 2:
            raise PipelineError(f"{store.path} has {n} row(s): scoring needs at least two")
        rows = cfg.rows or (0, n)
        if rows[1] > n:
            raise PipelineError(f"--rows {rows[0]}:{rows[1]}: the store has {n} rows (B must be at most {n})")
        t0 = time.perf_counter()
        offsets = store.score_offsets(cfg.metric, cfg.score_norm)  # by store row
        with LabelOrder(store, progress=cfg.progress) as src:
            ordered = offsets if offsets is None or src.order is None else offsets[src.order]  # label order
            mean, max_norm, dups = row_stats(src, cfg.metric, ordered)
            binning = stream_binning(src, mean, cfg.metric, max_norm, cfg, ordered)
            t1 = time.perf_counter()
            res = score_part(src, cfg, binning, mean, rows, dups, ordered)
        i, j = res.extreme[2], res.extreme[3]
        if i >= 0:
            shift = (0.0, 0.0) if offsets is None else (offsets[i], offsets[j])
            res.acc.max_distance = pair_distance(store.rows(i, i + 1)[0], store.rows(j, j + 1)[0], cfg.metric, shift)
        res.seconds = time.perf_counter() - t0
        info = part_info(store, cfg, binning, rows, res)
        info.update(seconds_prepare=t1 - t0, seconds_tiles=res.seconds - (t1 - t0))
    log.info("rows %d:%d: %d pairs (%d same) in %.1f s", rows[0], rows[1], res.n_pairs, info["n_positive"],
             res.seconds)  # fmt: skip
    if cfg.out is not None:
        write_part(Path(cfg.out), [info], res.acc, log_fpr=cfg.log_fpr)
    return info


__all__ = ["RowsConfig", "larger_than_memory", "parse_rows", "score_rows", "PART_FILE"]
