"""Pair scoring: every pair of a store in blocked tiles (torch or FAISS) streamed into one `HistogramROC`,
or the pairs a store lists; 10-fold accuracy; rank-1 identification; the results folder.

All-pairs in short: rows are sorted by identity once, so that the same-person pairs of any tile form at most
one rectangle (off-diagonal tiles) or a few blocks on the diagonal (diagonal leaves). The bins are chosen from
a sample, then each tile is one matrix product of augmented rows whose entries are directly bin coordinates:
`[x, |x|^2, 1] . s [-2y, 1, |y|^2 - lo]` = s (squared distance - lo) for l2 (rows centred first), and
`[x, 1] . s [y, -lo]` for cosine (rows normalised). Each tile is counted once for all its pairs and once for
its same-person slice of the *same* array, so both land in the same bins exactly; different-person counts are
the difference. CPU: NumPy's BLAS and `np.bincount` (single-threaded: no second thread pool taking turns with
the BLAS threads); GPU: torch and `torch.histc`. Memory: the rows (2 copies of N x (D+2) float32) + one tile
(block^2 floats) + an 8 MB bincount index buffer + 2 x bins counts, whatever the number of pairs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.blockmath import (
    GEMM_K,
    LEAF,
    STAT_ROWS,
    SampleRange,
    Tile,
    augment,
    balance,
    better_extreme,
    bin_range,
    blocked_mean,
    fixed_matmul,
    pair_distance,
    sample_rows,
    scale_right,
    tile_plan,
)
from pipeline.distributed import World, all_gather_rows, all_reduce_sum, init_world
from pipeline.errors import PipelineError
from pipeline.outputs import claim
from pipeline.results import RESULT_FILES, check_results_out, describe, json_attrs, write_results
from pipeline.roc import (
    Binning,
    HistogramROC,
    check_defined,
    exact_counts,
    roc_metrics,
    value_to_distance,
)
from pipeline.runtime import resolve_device
from pipeline.store import Store, bad_rows_error, open_store, recorded_data_root
from pipeline.tiles import TileLoop, TilePass, as_int64

log = logging.getLogger(__name__)

MAX_BLOCK = 4096  # a tile holds at most 2^24 values: float32 histogram counts stay exact
READ_ROWS_BYTES = 64 << 20


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


# ---------------------------------------------------------------------------------------------------- tiles


# Tile and tile_plan live in pipeline.blockmath (shared with out-of-core --rows scoring).


# ---------------------------------------------------------------------------------------------------- rows


@dataclass
class Prepared:
    """The store's rows sorted by identity, ready for tiles: `left @ right.T` is the binned value."""

    x: np.ndarray
    """[N, D] float32 sorted rows, centred (l2) or normalised (cosine): a view into `left`."""
    left: torch.Tensor
    """[N, D+2] rows [x, |x|^2, 1] (l2) or [N, D+1] rows [x, 1] (cosine)."""
    right: torch.Tensor
    """[N, D+2] rows [-2x, 1, |x|^2] (l2) or [N, D+1] rows [x, 0] (cosine): `left @ right.T` is the value."""
    labels: torch.Tensor
    """[N] int64 sorted labels on the device."""
    order: np.ndarray
    """Sorted position -> store row."""
    group_start: np.ndarray
    group_end: np.ndarray
    metric: str
    max_norm: float
    n_positive: int

    @property
    def n(self) -> int:
        return len(self.order)

    def scale_to_bins(self, b: Binning) -> None:
        """Make `left @ right.T` the bin coordinate `(value - lo) * bins / (hi - lo)` (in place, once): bin k
        holds coordinates [k, k+1). Nearest neighbours are unchanged (a positive scale and a shift)."""
        if self.right.device.type == "cpu":  # the same float32 operations as out-of-core blocks
            scale_right(self.right.numpy(), b.lo, b.hi, b.bins, self.x.shape[1], self.metric)
            return
        s = b.bins / (b.hi - b.lo)
        ones = self.x.shape[1] + (1 if self.metric == "l2" else 0)  # left's column of ones
        self.right *= float(np.float32(s))
        self.right[:, ones] -= float(np.float32(s * b.lo))


def read_rows(store: Store, out: np.ndarray | None = None) -> np.ndarray:
    """All rows as float32 (into `out` when given), read in blocks; NaN or infinite rows are an error that
    names them."""
    n, d = store.n, store.dim
    x = np.empty((n, d), dtype=np.float32) if out is None else out
    step = max(1, READ_ROWS_BYTES // max(1, d * 4))
    bad: list[int] = []
    for s in range(0, n, step):
        blk = store.rows(s, min(s + step, n))
        ok = np.isfinite(blk.sum(axis=1))  # NaN and inf propagate; an overflowing sum is checked exactly
        if not ok.all():
            ok = np.isfinite(blk).all(axis=1)
        if not ok.all():
            bad.extend((np.flatnonzero(~ok) + s).tolist())
        x[s : s + len(blk)] = blk
    if bad:
        raise bad_rows_error(store, bad)
    return x


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


def prepare(store: Store, metric: str, device: torch.device) -> Prepared:
    """Read, check, sort by identity and transform the rows of `store` for tile products on `device`."""
    if store.n < 2:
        raise PipelineError(f"{store.path} has {store.n} row(s): scoring needs at least two")
    labels = store.labels
    order = np.argsort(labels, kind="stable")
    d = store.dim
    left_np = np.empty((store.n, d + 2 if metric == "l2" else d + 1), dtype=np.float32)
    read_rows(store, out=left_np[:, :d])
    if (np.diff(labels) < 0).any():  # stores of `embed` are sorted by person already
        left_np = left_np[order]
    ls = labels[order]
    cuts = np.flatnonzero(np.diff(ls)) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(ls)]
    sizes = ends - starts
    n_positive = int((sizes * (sizes - 1) // 2).sum())
    gid = np.repeat(np.arange(len(starts)), sizes)
    x = left_np[:, :d]
    right_np = np.empty_like(left_np)
    mean = None
    if metric == "l2":  # centred: distances unchanged, less cancellation
        mean = blocked_mean((x[s : s + STAT_ROWS] for s in range(0, store.n, STAT_ROWS)), store.n)
    sq = np.empty(store.n, dtype=np.float64)
    for s in range(0, store.n, STAT_ROWS):  # per block, as out-of-core scoring does
        e = min(s + STAT_ROWS, store.n)
        sq[s:e] = augment(x[s:e], mean, metric, left_np[s:e], right_np[s:e])
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
    return Prepared(
        x, left, right, torch.from_numpy(ls).to(device), order, starts[gid], ends[gid], metric, max_norm, n_positive
    )


# ---------------------------------------------------------------------------------------------------- backends


class TorchTiles:
    """Tile values by one matrix product into a reused buffer. On the CPU with `gemm="auto"` the product goes
    through NumPy's BLAS into the same memory (OpenBLAS: as fast on half-size tiles as on 4096 x 4096 ones,
    where torch's MKL loses up to 1.5x on AMD CPUs); everything else stays in torch."""

    name = "torch"

    def __init__(self, prep: Prepared, block: int, gemm: str = "auto"):
        self.prep = prep
        self.buf = torch.empty(min(block, prep.n) ** 2, dtype=torch.float32, device=prep.left.device)
        self.numpy = gemm == "numpy" or (gemm == "auto" and prep.left.device.type == "cpu")
        if self.numpy:
            self.np_left, self.np_right, self.np_buf = prep.left.numpy(), prep.right.numpy(), self.buf.numpy()
            self.np_tmp = np.empty_like(self.np_buf) if prep.left.shape[1] > GEMM_K else None

    def values(self, t: Tile) -> torch.Tensor:
        m, k = t.r1 - t.r0, t.c1 - t.c0
        if self.numpy:
            out = self.np_buf[: m * k].reshape(m, k)
            tmp = None if self.np_tmp is None else self.np_tmp[: m * k].reshape(m, k)
            fixed_matmul(self.np_left[t.r0 : t.r1], self.np_right[t.c0 : t.c1], out, tmp)
            return self.buf[: m * k].view(m, k)
        out = self.buf[: m * k].view(m, k)
        return torch.mm(self.prep.left[t.r0 : t.r1], self.prep.right[t.c0 : t.c1].T, out=out)


class FaissTiles:
    """Tile values by `faiss.pairwise_distances` (squared L2 or inner product) on the CPU."""

    name = "faiss"

    def __init__(self, prep: Prepared, binning: Binning):
        import faiss

        self.faiss = faiss
        self.prep = prep
        self.lo, self.scale = np.float32(binning.lo), np.float32(binning.bins / (binning.hi - binning.lo))
        self.x = np.ascontiguousarray(prep.x)
        self.metric = faiss.METRIC_L2 if prep.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.device = prep.left.device

    def values(self, t: Tile) -> torch.Tensor:
        x = self.x
        v = self.faiss.pairwise_distances(x[t.r0 : t.r1], x[t.c0 : t.c1], self.metric)
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
    if prep.left.device.type == "cpu":  # NumPy's BLAS in fixed blocks, as out-of-core scoring does
        rng_ = SampleRange(rows, n)
        rng_.add(prep.left.numpy()[rows], prep.right.numpy(), 0)
        vmin, vmax = rng_.extremes()
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
    lo, hi = bin_range(vmin, vmax, prep.metric, prep.max_norm)
    return Binning(float(lo), float(hi), bins, prep.metric)


# ---------------------------------------------------------------------------------------------------- tile pass


class TileScorer(TileLoop):
    """The tile loop over the rows held in memory (sorted by identity): tiles from a backend, store rows of
    the extreme pair through the sort order."""

    def __init__(self, prep: Prepared, binning: Binning, backend, counting: str = "auto"):
        super().__init__(binning, lambda t, a2, b2: backend.values(t), prep.labels.cpu().numpy(), prep.metric,
                         prep.order, prep.left.device, counting)  # fmt: skip
        self.prep, self.backend = prep, backend


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
    prep = prepare(store, cfg.metric, device)
    check_defined(prep.n_positive, prep.n * (prep.n - 1) // 2 - prep.n_positive)
    binning = choose_binning(prep, cfg.bins, cfg.seed, cfg.sample_pairs)
    prep.scale_to_bins(binning)
    backend = make_backend(cfg.backend, prep, cfg.block, binning, cfg.gemm)
    plan = tile_plan(prep.n, cfg.block, leaf)
    scorer = TileScorer(prep, binning, backend)
    t1 = time.perf_counter()
    mine = balance([t.n_pairs for t in plan], world.size)[world.rank]
    res = scorer.run(plan, select=mine, progress=cfg.progress and world.is_main)
    acc = res.roc()
    if world.size > 1:
        acc = HistogramROC(binning)
        acc.add_counts(all_reduce_sum(as_int64(res.all_counts)), all_reduce_sum(as_int64(res.pos_counts)))
        res.n_pairs = int(all_reduce_sum(np.array([res.n_pairs], dtype=np.int64))[0])
        best = (float("nan"), -1, -1, -1)
        for cand in all_gather_rows([res.extreme, res.extreme_tile, *res.extreme_rows]):
            best = better_extreme(best, (cand[0], int(cand[1]), int(cand[2]), int(cand[3])), cfg.metric)
        res.extreme, res.extreme_tile, res.extreme_rows = best[0], best[1], (best[2], best[3])
    i, j = res.extreme_rows
    acc.max_distance = pair_distance(store.rows(i, i + 1)[0], store.rows(j, j + 1)[0], cfg.metric)
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
        "edge_bin_fraction": float((acc.pos[[0, -1]].sum() + acc.neg[[0, -1]].sum()) / max(1, res.n_pairs)),
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


def check_exact_fits(n_pairs: int) -> None:
    """--exact keeps every score: refuse up front when that cannot fit in the free memory."""
    need = 32 * n_pairs
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * avail:
        raise PipelineError(
            f"--exact needs about {need / 2**30:.1f} GiB for {n_pairs} pairs but {avail / 2**30:.1f} GiB are free; "
            f"drop --exact (the histogram AUC comes with auc_error_bound)"
        )


def exact_all_pairs(prep: Prepared, plan: list[Tile]) -> dict:
    """The exact AUC over float64 scores of every pair, by sorting (memory: about 32 bytes per pair)."""
    x = torch.from_numpy(prep.x).double()
    lab = torch.from_numpy(prep.labels.cpu().numpy())
    sq = (x * x).sum(1)
    values, positive = [], []
    for t in plan:
        if prep.metric == "l2":
            v = (sq[t.r0 : t.r1, None] + sq[None, t.c0 : t.c1] - 2 * x[t.r0 : t.r1] @ x[t.c0 : t.c1].T).clamp_min(0)
        else:
            v = x[t.r0 : t.r1] @ x[t.c0 : t.c1].T
        same = lab[t.r0 : t.r1, None] == lab[None, t.c0 : t.c1]
        if t.diagonal:
            m = torch.ones_like(same).triu(1)
            v, same = v[m], same[m]
        values.append(v.reshape(-1).numpy())
        positive.append(same.reshape(-1).numpy())
    pos, neg, thr = exact_counts(np.concatenate(values), np.concatenate(positive), prep.metric)
    return {"auc_exact": roc_metrics(pos, neg, thr, float("nan"), exact=True)["auc"]}


def listed_pairs(store: Store, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(binned values in float64, same-person flags, folds) of the pairs the store lists."""
    pairs, pair_labels, folds = store.pairs()
    if len(pairs) == 0:
        raise PipelineError(f"{store.path} lists no pairs")
    if pairs.min() < 0 or pairs.max() >= store.n:
        raise PipelineError(f"{store.path}: /pairs indexes rows outside 0..{store.n - 1}: the store is corrupt")
    x = read_rows(store).astype(np.float64)
    a, b = x[pairs[:, 0]], x[pairs[:, 1]]
    if metric == "l2":
        values = ((a - b) ** 2).sum(1)
    else:
        normalise(x[np.unique(pairs)], str(store.path))  # zero rows: error
        values = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return values, pair_labels.astype(bool), folds


def tenfold_accuracy(distance: np.ndarray, positive: np.ndarray, folds: np.ndarray) -> dict:
    """LFW View 2 accuracy: for each fold, the threshold that is best on the other folds, applied to it."""
    accs = []
    for k in np.unique(folds):
        train, test = folds != k, folds == k
        pos, neg, thr = exact_counts(distance[train] ** 2, positive[train], "l2")  # ascending distance groups
        correct = np.cumsum(pos) + neg.sum() - np.cumsum(neg)
        best = int(np.argmax(np.r_[neg.sum(), correct]))  # 0 = accept none
        if best == 0:
            t = thr[0] - 1.0
        else:
            t = math.inf if best == len(thr) else 0.5 * (thr[best - 1] + thr[best])
        accs.append(float(np.mean((distance[test] <= t) == positive[test])))
    a = np.array(accs)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {
        "accuracy_10fold_mean": float(a.mean()),
        "accuracy_10fold_std": std,
        "accuracy_10fold_sem": std / math.sqrt(len(a)),
        "accuracy_10fold": accs,
    }


def score_listed_pairs(store: Store, cfg: ScoreConfig) -> tuple[HistogramROC, dict, dict]:
    """The listed pairs: exact metrics (every score known), their histogram, and 10-fold accuracy."""
    t0 = time.perf_counter()
    values, positive, folds = listed_pairs(store, cfg.metric)
    check_defined(int(positive.sum()), int((~positive).sum()))
    distance = value_to_distance(values, cfg.metric)
    max_distance = float(distance.max())
    pos, neg, thr = exact_counts(values, positive, cfg.metric)
    metrics = roc_metrics(pos, neg, thr, max_distance, exact=True)
    lo, hi = float(values.min()), float(values.max())
    acc = HistogramROC(Binning(lo, hi if hi > lo else lo + 1e-6, cfg.bins, cfg.metric))
    acc.update(values, positive)
    acc.max_distance = max_distance
    extra = {"backend": "numpy", "auc_exact": metrics["auc"], "seconds": time.perf_counter() - t0}
    if len(np.unique(folds)) > 1:
        extra.update(tenfold_accuracy(distance, positive, folds))
    return acc, metrics, extra


# ---------------------------------------------------------------------------------------------------- rank-1


def rank1_accuracy(prep: Prepared, backend: str, block: int) -> dict:
    """Rank-1 identification: for each image whose person has another image, is its nearest other image (all
    other images are the gallery) of the same person? FAISS exact k-NN when installed, torch otherwise."""
    queries = np.flatnonzero(prep.group_end - prep.group_start > 1)
    if len(queries) == 0:
        return {"rank1_accuracy": float("nan"), "rank1_queries": 0}
    nearest = None
    if backend == "faiss":
        try:
            nearest = _nearest_faiss(prep, queries)
        except ImportError:
            log.warning("faiss is not installed: rank-1 by torch")
    if nearest is None:
        nearest = _nearest_torch(prep, queries, block)
    lab = prep.labels.cpu().numpy()
    hit = lab[nearest] == lab[queries]
    return {"rank1_accuracy": float(hit.mean()), "rank1_queries": int(len(queries))}


def _nearest_faiss(prep: Prepared, queries: np.ndarray) -> np.ndarray:
    import faiss

    index = (faiss.IndexFlatL2 if prep.metric == "l2" else faiss.IndexFlatIP)(prep.x.shape[1])
    x = np.ascontiguousarray(prep.x)
    index.add(x)
    _, nn = index.search(x[queries], 2)
    return np.where(nn[:, 0] == queries, nn[:, 1], nn[:, 0])


def _nearest_torch(prep: Prepared, queries: np.ndarray, block: int) -> np.ndarray:
    sign = 1.0 if prep.metric == "l2" else -1.0  # minimise sign * value
    out = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), block):
        q = torch.from_numpy(queries[s : s + block]).to(prep.left.device)
        best = torch.full((len(q),), math.inf, device=q.device)
        arg = torch.zeros(len(q), dtype=torch.int64, device=q.device)
        for c0 in range(0, prep.n, block):
            c1 = min(c0 + block, prep.n)
            v = sign * (prep.left[q] @ prep.right[c0:c1].T)
            own = (q >= c0) & (q < c1)
            v[own.nonzero().squeeze(1), (q[own] - c0)] = math.inf
            m, a = v.min(1)
            better = m < best
            best = torch.where(better, m, best)
            arg = torch.where(better, a + c0, arg)
        out[s : s + len(q)] = arg.cpu().numpy()
    return out


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
        t0 = time.perf_counter()
        if cfg.all_pairs:
            acc, extra = score_all_pairs(store, cfg, device, world=world)
            metrics = acc.compute()
        else:
            acc, metrics, extra = score_listed_pairs(store, cfg)
            if cfg.rank1:
                log.warning("--rank1 is computed over all images of the store, not only the listed pairs")
                t1 = time.perf_counter()
                extra.update(rank1_accuracy(prepare(store, cfg.metric, device), cfg.backend, cfg.block))
                extra["seconds_rank1"] = time.perf_counter() - t1
        # the scoring itself: without the checks that --rank1 and --exact add
        seconds = time.perf_counter() - t0 - extra.get("seconds_rank1", 0.0) - extra.get("seconds_exact", 0.0)
        extra.pop("seconds", None)
        attrs = json_attrs(store.attrs)
    roc = metrics.pop("roc")
    metrics.update(
        metric=cfg.metric,
        bins=cfg.bins,
        device=str(device),
        seconds=seconds,
        pairs_per_second=metrics["n_pairs"] / seconds if seconds > 0 else float("inf"),
        mode="all-pairs" if cfg.all_pairs else "pairs",
        **extra,
    )
    metrics["world_size"] = world.size
    if "auc_exact" in metrics:
        metrics["auc_minus_exact"] = metrics["auc"] - metrics["auc_exact"]
    metrics.update(
        **describe(attrs, Path(cfg.store), cfg.label, cfg.variant),
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    )
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
    "score",
    "score_store",
    "score_all_pairs",
    "score_listed_pairs",
    "tenfold_accuracy",
    "rank1_accuracy",
]
