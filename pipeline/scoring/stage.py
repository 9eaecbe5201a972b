"""The `score` stage: every pair of a store (rows in memory, `score_all_pairs`, also each torchrun rank's share
of the tiles; or a `--rows` span read from the store in blocks, `pipeline.scoring.all_pairs.score_rows`) or the
pairs it lists (`pipeline.scoring.listed`), into one `HistogramROC` and a results folder (a part folder for a
span, added up by `merge`). CPU: NumPy's BLAS (or torch's MKL, see `pipeline.scoring.blockmath`) and
`np.bincount`; GPU: torch and `torch.histc`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.distributed import World, all_gather_objects, all_gather_rows, all_reduce_sum, init_world
from pipeline.metrics.binning import Binning
from pipeline.metrics.roc import HistogramROC
from pipeline.metrics.tail import Tail
from pipeline.outputs import claim
from pipeline.report.results import RESULT_FILES, check_results_out, json_attrs, write_results
from pipeline.runtime import full_float32, resolve_device
from pipeline.scoring.all_pairs import count_all_pairs, farthest, score_rows
from pipeline.scoring.assemble import all_pairs_fields, assemble_metrics, timings
from pipeline.scoring.blockmath import LEAF, balance, better_extreme, single_threaded_blas, tile_plan
from pipeline.scoring.calibrate import calibrate, read_source
from pipeline.scoring.carry import Source, carry, read_threshold
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.counting import TilePass, as_int64
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.exact import check_exact_fits, exact_all_pairs
from pipeline.scoring.from_scores import export_writers, score_file
from pipeline.scoring.listed import score_listed_pairs, tenfold_accuracy
from pipeline.scoring.memory import MemoryRows
from pipeline.scoring.rank1 import rank1_accuracy
from pipeline.store.layout import Store, open_store, recorded_data_root

log = logging.getLogger(__name__)


def score_all_pairs(store: Store, cfg: ScoreConfig, device: torch.device, leaf: int = LEAF, world: World | None = None,
                    score: ScoreDefinition | None = None) -> tuple[HistogramROC, dict]:  # fmt: skip
    """Every pair of `store` (rows in memory) into a `HistogramROC`; extra facts (max pair, timings, exact AUC)
    in a dict. Under torchrun (`world.size > 1`) each rank scores its share of the tiles (balanced by pair count)
    and the counts and the extreme pair are combined with collectives: every rank returns the whole result.
    `score`: the store's `ScoreDefinition` under `cfg` (built here when None)."""
    world = world or World()
    t0 = time.perf_counter()
    if cfg.exact:
        check_exact_fits(store.n * (store.n - 1) // 2)
    with single_threaded_blas():
        score = score or ScoreDefinition.of(store, cfg.metric, cfg.score_norm)
        source = MemoryRows(store, score, device)
        plan = tile_plan(source.n, cfg.block, leaf)
        mine = balance([t.n_pairs for t in plan], world.size)[world.rank]
        counted = count_all_pairs(source, cfg, plan, mine, progress=cfg.progress and world.is_main)
        res = counted.res
        acc = res.roc() if world.size == 1 else _combined(res, counted.binning)
        farthest(acc, res, store, score)
        t2 = time.perf_counter()
        if acc.n_positive != source.stats.n_positive or res.n_pairs != source.stats.n_pairs:
            raise RuntimeError(f"internal error: counted {acc.n_positive} same-person pairs of "
                               f"{source.stats.n_positive}")  # fmt: skip
        extra = all_pairs_fields(acc, res.n_pairs, res.extreme_rows, counted.binning.lo, counted.binning.hi,
                                 len(plan), counted.backend, 1,
                                 timings(counted.prepared - t0, t2 - counted.prepared, res))  # fmt: skip
        if cfg.rank1:
            t3 = time.perf_counter()
            extra.update(rank1_accuracy(source, cfg.backend, cfg.block), seconds_rank1=time.perf_counter() - t3)
        if cfg.exact:
            t3 = time.perf_counter()
            extra.update(exact_all_pairs(source, plan), seconds_exact=time.perf_counter() - t3)
    return acc, extra


def _combined(res: TilePass, binning: Binning) -> HistogramROC:
    """The ranks' passes added up (every rank gets the whole): counts, exact tails, group counts, pairs and the
    extreme pair (`res` updated)."""
    metric = binning.metric
    acc = HistogramROC(binning)
    acc.add_counts(all_reduce_sum(as_int64(res.all_counts)), all_reduce_sum(as_int64(res.pos_counts)))
    acc.tail = Tail(res.tail.k, res.tail.metric)
    for part in all_gather_objects((res.tail.neg, res.tail.pos, res.tail.neg_ids, res.tail.pos_ids)):
        acc.tail.add(*part)
    acc.tail.finish()
    acc.groups = (*(all_reduce_sum(as_int64(c)) for c in res.groups[:2]), res.groups[2])
    res.n_pairs = int(all_reduce_sum(np.array([res.n_pairs], dtype=np.int64))[0])
    best = (float("nan"), -1, -1, -1)
    for cand in all_gather_rows([res.extreme, res.extreme_tile, *res.extreme_rows]):
        best = better_extreme(best, (cand[0], int(cand[1]), int(cand[2]), int(cand[3])), metric)
    res.extreme, res.extreme_tile, res.extreme_rows = best[0], best[1], (best[2], best[3])
    return acc


# ---------------------------------------------------------------------------------------------------- stage


def score(cfg: ScoreConfig) -> dict:
    """Score a store (all pairs or its listed pairs) or a score file, write the results folder, return
    metrics.json's dict; with `cfg.rows`, the part's (`score_rows`)."""
    if cfg.rows is not None:
        return score_rows(cfg)
    if cfg.scores is not None:
        return score_file(cfg)
    out = None if cfg.out is None else Path(cfg.out)
    inputs = [Path(p) for p in (cfg.store, cfg.calibrate_on, cfg.threshold_from) if p is not None]
    if cfg.calibrate_on is not None:
        read_source(cfg.calibrate_on)  # a missing or unreadable source fails before the scoring
    carried = None if cfg.threshold_from is None else read_threshold(cfg.threshold_from, cfg.at_far, cfg.metric)
    if out is not None:
        data_root = recorded_data_root(cfg.store)
        check_results_out(out, cfg.overwrite, inputs, data_root)
    world, device = init_world(resolve_device(cfg.device))  # torchrun: tiles split over the ranks
    world.barrier()  # every rank has checked the results folder before rank 0 writes it
    # all pairs: the whole call (the metrics' float64 sums too) with single-threaded BLAS, as it always ran
    with single_threaded_blas() if cfg.all_pairs else contextlib.nullcontext():
        if out is None or not world.is_main:  # rank 0 alone writes, so it alone holds the output's lock
            return _score_locked(cfg, world, device, carried)
        with claim(out, lambda: check_results_out(out, cfg.overwrite, inputs, data_root), RESULT_FILES):
            return _score_locked(cfg, world, device, carried)


def _score_locked(cfg: ScoreConfig, world: World, device: torch.device, carried: Source | None = None) -> dict:
    with open_store(cfg.store, need_labels=cfg.all_pairs or cfg.rank1) as store, full_float32(device):
        score = ScoreDefinition.of(store, cfg.metric, cfg.score_norm)
        t0 = time.perf_counter()
        if cfg.all_pairs:
            acc, extra = score_all_pairs(store, cfg, device, world=world, score=score)
            metrics = acc.compute()
        else:
            acc, metrics, extra = score_listed_pairs(store, cfg, score)
            if cfg.rank1:
                log.warning("--rank1 is computed over all images of the store, not only the listed pairs")
                t1 = time.perf_counter()
                extra.update(rank1_accuracy(MemoryRows(store, score, device), cfg.backend, cfg.block))
                extra["seconds_rank1"] = time.perf_counter() - t1
        # the scoring itself: without the checks that --rank1 and --exact add
        seconds = time.perf_counter() - t0 - extra.get("seconds_rank1", 0.0) - extra.get("seconds_exact", 0.0)
        extra.pop("seconds", None)
        attrs = json_attrs(store.attrs)
    roc = metrics.pop("roc")
    metrics = assemble_metrics(metrics, extra, metric=cfg.metric, score_norm=score.norm, bins=cfg.bins, device=str(device),
                               seconds=seconds, mode="all-pairs" if cfg.all_pairs else "pairs", world_size=world.size,
                               attrs=attrs, store=cfg.store, label=cfg.label, variant=cfg.variant,
                               config=asdict(cfg))  # fmt: skip
    log.info(
        "AUC %.6f (+- %.1e binning) over %d pairs (%d same) in %.3f s (%.3g pairs/s)",
        metrics["auc"],
        metrics["auc_error_bound"],
        metrics["n_pairs"],
        metrics["n_positive"],
        seconds,
        metrics["pairs_per_second"],
    )
    more = calibrate(metrics, acc, cfg.calibrate_on) if cfg.calibrate_on is not None else {}
    if carried is not None:
        carry(metrics, acc, carried)
    if cfg.out is not None and world.is_main:
        more.update(export_writers(cfg, score) if cfg.export else {})
        write_results(Path(cfg.out), metrics, roc, acc, log_fpr=cfg.log_fpr, more=more)
    return metrics


def score_store(store: Path | str, out: Path | str | None, all_pairs: bool = True, **options) -> dict:
    """`score` for other stages: `score_store(path, out_dir, all_pairs=True, metric="l2", ...)` -> metrics."""
    return score(ScoreConfig(store=Path(store), out=None if out is None else Path(out), all_pairs=all_pairs, **options))


__all__ = [
    "ScoreConfig",
    "score",
    "score_store",
    "score_rows",
    "score_all_pairs",
    "score_listed_pairs",
    "tenfold_accuracy",
    "rank1_accuracy",
]
