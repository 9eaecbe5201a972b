"""All-pairs scoring, one path for every way of running it: a row source (`pipeline.scoring.sources`; rows in
memory, or read from the store in blocks) gives its statistics and a sample for the bins; the bins are chosen
once (`choose_binning`), the source's right operands scaled to them, and the one tile loop
(`pipeline.scoring.tiles`) counts the tiles of the plan that are this run's share: a torchrun rank's tiles
(`pipeline.scoring.stage.score_all_pairs`, combined with collectives) or the tiles of a span of rows read from
the store (`score_part`, out of core and without torch: the part folders of `score_rows` are added by `merge`).

In short: each tile is one matrix product of augmented rows whose entries are directly bin coordinates:
`[x, |x|^2, 1] . s [-2y, 1, |y|^2 - lo]` = s (squared distance - lo) for l2 (rows centred first), and
`[x, 1] . s [y, -lo]` for cosine (rows normalised; with score offsets, `[x, -o_x, 1] . s [y, 1, -o_y - lo]` =
s (cos - o_x - o_y - lo)). Each tile is counted once for all its pairs and once for its same-person pairs of the
*same* array, so both land in the same bins exactly; different-person counts are the difference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.metrics.binning import Binning
from pipeline.metrics.curve import check_defined
from pipeline.metrics.roc import HistogramROC
from pipeline.outputs import claim
from pipeline.report.results import RESULT_FILES, check_results_out
from pipeline.scoring.assemble import part_info, timings
from pipeline.scoring.blockmath import LEAF, chunk_side, single_threaded_blas, tile_plan
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.counting import TilePass
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.merge import write_part
from pipeline.scoring.rows import StoreRows
from pipeline.scoring.sources import RowSource, choose_binning
from pipeline.scoring.tiles import TileLoop
from pipeline.store.layout import Store, open_store, recorded_data_root

log = logging.getLogger(__name__)


@dataclass
class Counted:
    """One pass of the tile loop over this run's share of the plan."""

    binning: Binning
    res: TilePass
    backend: str
    """What multiplied the tiles (`tiles(...).name`)."""
    prepared: float
    """`time.perf_counter()` when the tiles started (rows, statistics and bins ready)."""


def count_all_pairs(source: RowSource, cfg: ScoreConfig, plan: list, select: list[int] | None = None,
                    span: tuple[int, int] | None = None, progress: bool = True) -> Counted:  # fmt: skip
    """Bins from the source's sample, then the tiles `plan[i]` for i in `select` (default: all), only the pairs
    of rows in `span`, counted with the exact tail and the jackknife's group counts."""
    stats = source.stats
    check_defined(stats.n_positive, stats.n_negative)
    binning = choose_binning(source, cfg.bins, cfg.seed, cfg.sample_pairs)
    source.scale_to_bins(binning)
    tiles = source.tiles(cfg, binning)
    loop = TileLoop.over(source, tiles, binning, side=chunk_side(cfg.block), tail_k=stats.tail_k)
    t1 = time.perf_counter()
    res = loop.run(plan, select=select, span=span, progress=progress)
    return Counted(binning, res, tiles.name, t1)


def farthest(acc: HistogramROC, res: TilePass, store: Store, score: ScoreDefinition) -> None:
    """`acc.max_distance`: the distance of the pass's least similar pair, recomputed in float64 from the store."""
    i, j = res.extreme_rows
    if i >= 0:
        acc.max_distance = score.pair_distance(store, i, j)


def score_part(store: Store, cfg: ScoreConfig) -> tuple[HistogramROC, dict]:
    """The pairs i < j (label order) with i in `cfg.rows` (default: every row), rows read from the store in
    blocks, into a `HistogramROC` and the part's part.json dict."""
    t0 = time.perf_counter()
    n = store.n
    rows = cfg.rows or (0, n)
    if rows[1] > n:
        raise PipelineError(f"--rows {rows[0]}:{rows[1]}: the store has {n} rows (B must be at most {n})")
    score = ScoreDefinition.of(store, cfg.metric, cfg.score_norm)
    with single_threaded_blas(), StoreRows(store, score, progress=cfg.progress) as source:
        plan = tile_plan(n, cfg.block, LEAF)
        mine = [k for k, t in enumerate(plan) if t.r0 < rows[1] and t.r1 > rows[0] and t.n_pairs]
        counted = count_all_pairs(source, cfg, plan, mine, span=rows, progress=cfg.progress)
        res = counted.res
        acc = res.roc()
        farthest(acc, res, store, score)
    extreme = (res.extreme, res.extreme_tile, *res.extreme_rows)
    info = part_info(store, cfg, score, counted.binning, rows, acc, res.n_pairs, extreme, len(plan), LEAF)
    t2 = time.perf_counter()
    info.update(seconds=t2 - t0, **timings(counted.prepared - t0, t2 - counted.prepared, res))
    return acc, info


def score_rows(cfg: ScoreConfig) -> dict:
    """Score the pairs of `cfg.rows` (None: every row) out of core; write the part folder (the full results too
    when the part covers every row); return its part.json dict. The whole call (the metrics' float64 sums too)
    runs with single-threaded BLAS, as in-memory scoring does."""
    if cfg.out is None:
        with single_threaded_blas():
            return _score_rows(cfg)
    out, inputs, data_root = Path(cfg.out), [Path(cfg.store)], recorded_data_root(cfg.store)
    with single_threaded_blas(), claim(out, lambda: check_results_out(out, cfg.overwrite, inputs, data_root),
                                       RESULT_FILES):  # fmt: skip
        return _score_rows(cfg)


def _score_rows(cfg: ScoreConfig) -> dict:
    with open_store(cfg.store, need_labels=True) as store:
        acc, info = score_part(store, cfg)
    log.info("rows %d:%d: %d pairs (%d same) in %.1f s", *info["rows"], info["n_pairs"], info["n_positive"],
             info["seconds"])  # fmt: skip
    if cfg.out is not None:
        write_part(Path(cfg.out), [info], acc, log_fpr=cfg.log_fpr)
    return info
