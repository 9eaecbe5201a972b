"""The `score` stage: every pair of a store (in memory, or each torchrun rank's share of the tiles) or the pairs
it lists, into one `HistogramROC` and a results folder.

All-pairs in short: the bins are chosen from a sample, then each tile is one matrix product of augmented rows
whose entries are directly bin coordinates: `[x, |x|^2, 1] . s [-2y, 1, |y|^2 - lo]` = s (squared distance -
lo) for l2 (rows centred first), and `[x, 1] . s [y, -lo]` for cosine (rows normalised; with score offsets,
`[x, -o_x, 1] . s [y, 1, -o_y - lo]` = s (cos - o_x - o_y - lo)). Each tile is counted once for all its pairs and
once for its same-person pairs of the *same* array, so both land in the same bins exactly; different-person counts
are the difference (`pipeline.scoring.tiles`). CPU: NumPy's BLAS (or torch's MKL, see `pipeline.scoring.blockmath`) and
`np.bincount`; GPU: torch and `torch.histc`. Rows in memory: `pipeline.scoring.memory`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.distributed import World, all_gather_objects, all_gather_rows, all_reduce_sum, init_world
from pipeline.metrics.roc import (
    HistogramROC,
    check_defined,
)
from pipeline.metrics.tail import Tail, tail_size
from pipeline.outputs import claim
from pipeline.report.results import RESULT_FILES, check_results_out, json_attrs, write_results
from pipeline.runtime import resolve_device
from pipeline.scoring.assemble import assemble_metrics, edge_bin_fraction
from pipeline.scoring.blockmath import (
    LEAF,
    Tile,
    balance,
    better_extreme,
    pair_distance,
    tile_plan,
)
from pipeline.scoring.counting import TilePass, as_int64
from pipeline.scoring.exact import check_exact_fits, exact_all_pairs
from pipeline.scoring.listed import score_listed_pairs, tenfold_accuracy
from pipeline.scoring.memory import FaissTiles, TileScorer, TorchTiles, choose_binning, make_backend, prepare
from pipeline.scoring.rank1 import rank1_accuracy
from pipeline.store.layout import Store, open_store, recorded_data_root

log = logging.getLogger(__name__)

MAX_BLOCK = 4096  # a tile holds at most 2^24 values: float32 histogram counts stay exact


@dataclass(frozen=True)
class ScoreConfig:
    """Configuration of `score`: which pairs of which store, how, and where the results go."""

    store: Path
    """The HDF5 embedding store (needs /embeddings and /labels; /pairs for `pairs`)."""
    out: Path | None = None
    """Results folder (metrics.json, roc.csv, roc.png, histogram.npz); None writes nothing."""
    all_pairs: bool = True
    """True: every unordered pair i < j. False: the pairs listed in the store (embed --protocol pairs|10fold)."""
    metric: str = "l2"
    """l2: Euclidean distance (the study's); cosine: cosine similarity."""
    bins: int = 1 << 18
    """Histogram bins over the data's score range (more bins: smaller `auc_error_bound`, slower)."""
    block: int = 4096
    """Rows per tile side (a tile holds block^2 scores; at most 4096)."""
    backend: str = "torch"
    """torch, or faiss (pairwise distances by FAISS; falls back to torch when faiss is not installed)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    gemm: str = "auto"
    """Tile products of the torch backend: auto (NumPy's BLAS on the CPU, torch on CUDA), torch or numpy."""
    exact: bool = False
    """Also compute the exact AUC by sorting every score in float64 (checking; needs memory for all pairs)."""
    rank1: bool = False
    """Also compute rank-1 identification accuracy (nearest other image shows the same person)."""
    overwrite: bool = False
    """Replace an existing results folder."""
    log_fpr: bool = False
    """Draw roc.png with a logarithmic false-positive-rate axis."""
    seed: int = 0
    """Seed of the pair sample that sets the bin range."""
    sample_pairs: int = 1 << 18
    """About this many pairs (random rows against all rows) are scored first to find the score range for the bins."""
    progress: bool = True
    """Show a progress bar with pairs/s."""
    label: str | None = None
    """Name of this result in legends and tables (default: model and weights from the store)."""
    variant: str | None = None
    """pretrained or finetuned, for `report`'s table (default: guessed from the store's weights)."""
    score_norm: bool = True
    """Subtract the store's score offsets (cohort normalisation, cosine only) when it has them; False: plain
    scores (`--no-score-norm`)."""

    def __post_init__(self):
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"--metric must be l2 or cosine, not {self.metric!r}")
        if not 2 <= self.bins <= 1 << 24:
            raise ValueError(f"--bins must be between 2 and {1 << 24}, not {self.bins}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(
                f"--block must be between 1 and {MAX_BLOCK} (a tile holds block^2 scores), not {self.block}"
            )
        if self.gemm not in ("auto", "torch", "numpy"):
            raise ValueError(f"gemm must be auto, torch or numpy, not {self.gemm!r}")
        if self.backend not in ("torch", "faiss"):
            raise ValueError(f"--backend must be torch or faiss, not {self.backend!r}")
        if self.sample_pairs < 1:
            raise ValueError(f"sample_pairs must be at least 1, not {self.sample_pairs}")
        if self.variant not in (None, "pretrained", "finetuned"):
            raise ValueError(f"variant must be pretrained or finetuned, not {self.variant!r}")


# ---------------------------------------------------------------------------------------------------- modes


@contextlib.contextmanager
def _ieee_matmul(device: torch.device):
    """Full float32 products on CUDA (no TF32) while scoring."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def score_all_pairs(
    store: Store, cfg: ScoreConfig, device: torch.device, leaf: int = LEAF, world: World | None = None
) -> tuple[HistogramROC, dict]:
    """Every pair of `store` into a `HistogramROC`; extra facts (max pair, timings, exact AUC) in a dict.

    Under torchrun (`world.size > 1`) each rank scores its share of the tiles (balanced by pair count) and the
    counts and the extreme pair are combined with collectives: every rank returns the whole result."""
    world = world or World()
    if world.size > 1 and cfg.backend == "faiss":
        log.warning("--backend faiss sums with its own threads: under torchrun the result can differ from one "
                    "process in the last bit of some pairs (the default backend is exact)")  # fmt: skip
    t0 = time.perf_counter()
    if cfg.exact:
        check_exact_fits(store.n * (store.n - 1) // 2)
    prep = prepare(store, cfg.metric, device, cfg.score_norm)
    check_defined(prep.n_positive, prep.n * (prep.n - 1) // 2 - prep.n_positive)
    binning = choose_binning(prep, cfg.bins, cfg.seed, cfg.sample_pairs)
    prep.scale_to_bins(binning)
    backend = make_backend(cfg.backend, prep, cfg.block, binning, cfg.gemm)
    plan = tile_plan(prep.n, cfg.block, leaf)
    scorer = TileScorer(prep, binning, backend, tail_k=tail_size(prep.n * (prep.n - 1) // 2, prep.n_positive))
    t1 = time.perf_counter()
    mine = balance([t.n_pairs for t in plan], world.size)[world.rank]
    res = scorer.run(plan, select=mine, progress=cfg.progress and world.is_main)
    if world.size == 1:
        acc = res.roc()
    else:
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
            best = better_extreme(best, (cand[0], int(cand[1]), int(cand[2]), int(cand[3])), cfg.metric)
        res.extreme, res.extreme_tile, res.extreme_rows = best[0], best[1], (best[2], best[3])
    i, j = res.extreme_rows
    offsets = store.score_offsets(cfg.metric, cfg.score_norm)
    shift = (0.0, 0.0) if offsets is None else (offsets[i], offsets[j])
    acc.max_distance = pair_distance(store.rows(i, i + 1)[0], store.rows(j, j + 1)[0], cfg.metric, shift)
    t2 = time.perf_counter()
    if acc.n_positive != prep.n_positive or res.n_pairs != prep.n * (prep.n - 1) // 2:
        raise RuntimeError(f"internal error: counted {acc.n_positive} same-person pairs of {prep.n_positive}")
    extra = {
        "backend": backend.name,
        "max_distance_pair": [i, j],
        "bin_lo": binning.lo,
        "bin_hi": binning.hi,
        "n_tiles": len(plan),
        "world_size": world.size,
        "edge_bin_fraction": edge_bin_fraction(acc, res.n_pairs),
        "parts": 1,
        "seconds": t2 - t0,
        "seconds_prepare": t1 - t0,
        "seconds_tiles": t2 - t1,
    }
    if cfg.rank1:
        t3 = time.perf_counter()
        extra.update(rank1_accuracy(prep, cfg.backend, cfg.block), seconds_rank1=time.perf_counter() - t3)
    if cfg.exact:
        t3 = time.perf_counter()
        extra.update(exact_all_pairs(prep, plan), seconds_exact=time.perf_counter() - t3)
    return acc, extra


# ---------------------------------------------------------------------------------------------------- stage


def score(cfg: ScoreConfig) -> dict:
    """Score a store (all pairs or its listed pairs), write the results folder, return metrics.json's dict."""
    out = None if cfg.out is None else Path(cfg.out)
    if out is not None:
        data_root = recorded_data_root(cfg.store)
        check_results_out(out, cfg.overwrite, [Path(cfg.store)], data_root)
    world, device = init_world(resolve_device(cfg.device))  # torchrun: tiles split over the ranks
    world.barrier()  # every rank has checked the results folder before rank 0 writes it
    if out is None or not world.is_main:  # rank 0 alone writes, so it alone holds the output's lock
        return _score_locked(cfg, world, device)
    with claim(out, lambda: check_results_out(out, cfg.overwrite, [Path(cfg.store)], data_root), RESULT_FILES):
        return _score_locked(cfg, world, device)


def _score_locked(cfg: ScoreConfig, world: World, device: torch.device) -> dict:
    with open_store(cfg.store, need_labels=cfg.all_pairs or cfg.rank1) as store, _ieee_matmul(device):
        norm = None if store.score_offsets(cfg.metric, cfg.score_norm) is None else store.score_norm
        t0 = time.perf_counter()
        if cfg.all_pairs:
            acc, extra = score_all_pairs(store, cfg, device, world=world)
            metrics = acc.compute()
        else:
            acc, metrics, extra = score_listed_pairs(store, cfg)
            if cfg.rank1:
                log.warning("--rank1 is computed over all images of the store, not only the listed pairs")
                t1 = time.perf_counter()
                extra.update(rank1_accuracy(prepare(store, cfg.metric, device, cfg.score_norm), cfg.backend,
                                            cfg.block))  # fmt: skip
                extra["seconds_rank1"] = time.perf_counter() - t1
        # the scoring itself: without the checks that --rank1 and --exact add
        seconds = time.perf_counter() - t0 - extra.get("seconds_rank1", 0.0) - extra.get("seconds_exact", 0.0)
        extra.pop("seconds", None)
        attrs = json_attrs(store.attrs)
    roc = metrics.pop("roc")
    metrics = assemble_metrics(metrics, extra, metric=cfg.metric, score_norm=norm, bins=cfg.bins, device=str(device),
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
    if cfg.out is not None and world.is_main:
        write_results(Path(cfg.out), metrics, roc, acc, log_fpr=cfg.log_fpr)
    return metrics


def score_store(store: Path | str, out: Path | str | None, all_pairs: bool = True, **options) -> dict:
    """`score` for other stages: `score_store(path, out_dir, all_pairs=True, metric="l2", ...)` -> metrics."""
    return score(ScoreConfig(store=Path(store), out=None if out is None else Path(out), all_pairs=all_pairs, **options))


__all__ = [
    "ScoreConfig",
    "Tile",
    "tile_plan",
    "prepare",
    "choose_binning",
    "TileScorer",
    "TilePass",
    "TorchTiles",
    "FaissTiles",
    "score",
    "score_store",
    "score_all_pairs",
    "score_listed_pairs",
    "tenfold_accuracy",
    "rank1_accuracy",
]
