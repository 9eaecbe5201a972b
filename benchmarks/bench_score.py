"""Benchmark of all-pairs scoring: `score --all-pairs` against the floor (matrix product + one 65,536-bin
histogram update per pair, measured in the same process with the method of ../shared/tools/floor.py) and
against the alternatives a user has, on random stores with ties. Each method runs in its own fresh process
so that its peak resident memory is its own; methods too slow or too big for the whole store run on the
pairs of its first rows and are extrapolated (marked ~).

    python -m benchmarks.bench_score [--sizes 3708x1000,100000x128]     (same as: cli.py bench score ...)
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.score_peers import PEERS
from pipeline.runtime import resolve_device


@dataclass(frozen=True)
class BenchScoreConfig:
    """Options of `cli.py bench score`."""

    sizes: tuple[tuple[int, int], ...] = ((3708, 1000), (100_000, 128))
    """Random stores N x D to score (on a GPU, 1,000,000 x 512 is added)."""
    peers: bool = True
    """Also time scikit-learn, torchmetrics, FAISS + numpy and the study's Python loop."""
    device: str = "auto"
    """auto | cpu | cuda (ours; the peers run where they run)."""
    workdir: Path | None = None
    """Folder for the random stores (default: a temporary folder)."""
    bins: int = 1 << 18
    """Bins of our histograms."""
    peer_pairs: int = 20_000_000
    """Pairs above which a peer runs on the first rows only and is extrapolated."""

    def __post_init__(self):
        if not self.sizes or any(n < 2 or d < 1 for n, d in self.sizes):
            raise ValueError(f"sizes must be N x D with N >= 2, D >= 1: {self.sizes}")


# ---------------------------------------------------------------------------------------------------- helpers


def floor_seconds(n: int, d: int, device: torch.device | None = None, repeats: int = 3) -> float:
    """The floor of ../shared/tools/floor.py: gemm time per pair (4096 x 4096 x D) + torch.histc per value
    (65,536 bins, 2^24 values), times n(n-1)/2; on `device`."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    b = min(n, 4096)
    x, y = torch.randn(b, d, device=device), torch.randn(b, d, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    x @ y.T
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        x @ y.T
    sync()
    gemm_per_pair = (time.perf_counter() - t) / repeats / (b * b)
    v = torch.rand(1 << 24, device=device)
    torch.histc(v, bins=65536, min=0, max=1)
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        torch.histc(v, bins=65536, min=0, max=1)
    sync()
    hist_per_pair = (time.perf_counter() - t) / repeats / v.numel()
    return n * (n - 1) / 2 * (gemm_per_pair + hist_per_pair)


def write_random_store(path: Path, n: int, d: int, seed: int = 0) -> Path:
    """LFWPeople-like labels (n * 1711 / 3708 people), a weak identity signal (AUC about 0.7), and ties: 2.5%
    of rows are exact copies of other rows with their label, 2.5% under another label (cross-class ties)."""
    import h5py

    rng = np.random.default_rng(seed)
    n_ids = max(2, round(n * 1711 / 3708))
    labels = rng.integers(0, n_ids, size=n)
    signal = np.float32((0.8 / np.sqrt(d)) ** 0.5)
    centres = rng.standard_normal((n_ids, d), dtype=np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 15):
        lab = labels[s : s + (1 << 15)]
        x[s : s + len(lab)] = signal * centres[lab] + rng.standard_normal((len(lab), d), dtype=np.float32)
    k = n // 40
    src, dst = rng.integers(0, n, size=2 * k), rng.choice(n, size=2 * k, replace=False)
    x[dst] = x[src]
    labels[dst[:k]] = labels[src[:k]]  # the same image twice
    labels[dst[k:]] = rng.integers(0, n_ids, size=k)  # the same picture under another name
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=x, chunks=(min(n, 4096), d))
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.attrs.update(model="random", protocol="people", image_set="random")
    return path


def blas_kernels() -> str:
    """The BLAS libraries loaded (NumPy's; FAISS's too once imported) and their kernels (OpenBLAS picks them from the
    CPU unless OPENBLAS_CORETYPE says)."""
    from threadpoolctl import threadpool_info

    libs = [f"{i['internal_api']} {i['version']} {i.get('architecture', '')}".strip()
            for i in threadpool_info() if i["user_api"] == "blas"]  # fmt: skip
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return ", ".join(libs) + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows_for(n: int, budget: int) -> int:
    """Rows whose all-pairs count is about `budget` (at most n)."""
    return min(n, int((1 + np.sqrt(1 + 8 * budget)) / 2))


def _load(path: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["embeddings"][:rows].astype(np.float32), f["labels"][:rows]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# ---------------------------------------------------------------------------------------------------- methods


SMALL_PAIRS = 100_000_000  # stores up to this many pairs are scored SMALL_REPEATS times
SMALL_REPEATS = 3


def run_method(method: str, path: str, n: int, d: int, device: str, bins: int, peer_pairs: int) -> dict:
    """One measurement in this (fresh) process: floor first, then the method. Returns a table row."""
    import logging

    logging.disable(logging.WARNING)
    dev = resolve_device(device) if method.startswith("ours") else torch.device("cpu")
    floor = floor_seconds(n, d, dev)
    n_pairs = n * (n - 1) // 2
    row = {"method": method, "n": n, "d": d, "pairs": n_pairs, "floor": floor, "auc": float("nan"), "note": ""}
    if method.startswith("ours"):
        from pipeline.scoring.stage import ScoreConfig, score

        metric = "cosine" if "cosine" in method else "l2"
        backend = "faiss" if "faiss" in method else "torch"
        cfg = ScoreConfig(store=Path(path), metric=metric, backend=backend, device=device, bins=bins, progress=False)
        # Sub-second runs are noisy on a shared 2-core machine: the median of 3 (the floor averages 3 too).
        repeats = SMALL_REPEATS if n_pairs <= SMALL_PAIRS else 1
        times, splits, parts = [], [], []
        for _ in range(repeats):
            m = score(cfg)
            times.append(m["seconds"])
            splits.append(f"{m['seconds_prepare'] * 1e3:.0f}+{m['seconds_tiles'] * 1e3:.0f}")
            parts.append((m["seconds_products"], m["seconds_counting"]))
        row.update(
            seconds=float(np.median(times)), auc=m["auc"], bound=m["auc_error_bound"], n_positive=m["n_positive"]
        )
        if dev.type == "cpu":
            row.update(product_split(parts, n, d, metric, backend, cfg.block))
        row["note"] = f"bound {m['auc_error_bound']:.1e}, {m['n_positive']} same"
        if repeats > 1:
            row["note"] += (
                f", median of {repeats} (first (cold) {times[0]:.3f} s = {times[0] / floor:.2f}x floor); "
                f"preparation + tiles, ms: {', '.join(splits)}"
            )
        row["blas"] = blas_kernels()
        if m["n_pairs"] != n_pairs:
            raise RuntimeError(f"scored {m['n_pairs']} pairs of {n_pairs}")
    else:
        rows = _rows_for(n, peer_pairs if not method.startswith("torchmetrics") else peer_pairs // 100)
        if method == "study loop":
            rows = _rows_for(n, 200_000)
        part = rows * (rows - 1) // 2
        x, labels = _load(Path(path), rows)
        metric = "cosine" if "cosine" in method else "l2"
        base = _rss_mb()
        t0 = time.perf_counter()
        row["auc"], row["n_positive"] = PEERS[method.replace(" (cosine)", "")](x, labels, metric)
        row["seconds"] = (time.perf_counter() - t0) * n_pairs / part
        row["peak_mb"] = _peak_mb()
        if part < n_pairs:
            row["extrapolated_from"] = part
            row["auc"] = float("nan")
            row["note"] = f"~ from {part:.3g} pairs"
            if method.startswith(("scikit", "study")):  # memory grows with the pairs
                row["peak_mb"] = base + (row["peak_mb"] - base) * n_pairs / part
                row["note"] += ", memory too"
        return row
    row["peak_mb"] = _peak_mb()
    return row


def product_split(parts: list[tuple[float, float]], n: int, d: int, metric: str, backend: str, block: int) -> dict:
    """Where the tiles' time went (medians over the calls; seconds summed over the product threads): products and
    counting, and the products' GFLOP/s (per thread) beside NumPy's BLAS on the same block shape, timed here."""
    from pipeline.scoring.blockmath import LEAF, chunk_side, product_flops, tile_plan
    from pipeline.scoring.definition import ScoreDefinition

    plan = tile_plan(n, block, LEAF)
    width = ScoreDefinition(metric).width(d)
    # FAISS: the same canonical blocks, of the rows themselves (its squared distances add the norms)
    flops = product_flops(plan, d if backend == "faiss" else width, chunk_side(block))
    products, counting = (float(np.median(v)) for v in zip(*parts, strict=True))
    out = {"products": products, "counting": counting, "gflops": flops / products / 1e9}
    if backend != "faiss":
        out["blas_gflops"] = bare_block_gflops(min(chunk_side(block), n), width)
    return out


def bare_block_gflops(side: int, width: int, seconds: float = 0.2) -> float:
    """Single-threaded GFLOP/s of NumPy's BLAS on the products' canonical call: `side` x `side` blocks, the inner
    dimension in chunks of at most `GEMM_K` (`pipeline.scoring.blockmath.fixed_matmul`), into a reused block."""
    from pipeline.scoring.blockmath import GEMM_K, single_threaded_blas

    k = -(-width // -(-width // GEMM_K))  # the widest chunk
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((side, k), dtype=np.float32), rng.standard_normal((side, k), dtype=np.float32)
    out = np.empty((side, side), dtype=np.float32)
    with single_threaded_blas():
        np.matmul(a, b.T, out=out)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            np.matmul(a, b.T, out=out)
            calls += 1
        elapsed = time.perf_counter() - t0
    return 2 * side * side * k * calls / elapsed / 1e9


def _in_child(*args) -> dict:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(run_method, *args).result()


def run_bench(cfg: BenchScoreConfig) -> list[dict]:
    """All measurements, one fresh process each; rows of the table."""
    sizes = list(cfg.sizes)
    if resolve_device(cfg.device).type == "cuda" and (1_000_000, 512) not in sizes:
        sizes.append((1_000_000, 512))
    rows = []
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as tmp:
        for n, d in sizes:
            path = str(write_random_store(Path(tmp) / f"random_{n}x{d}.h5", n, d))
            methods = ["ours l2", "ours cosine", "ours l2 faiss"]
            if cfg.peers:
                methods += ["scikit-learn exact", "scikit-learn exact (cosine)", *list(PEERS)[1:]]
            for method in methods:
                row = _in_child(method, path, n, d, cfg.device, cfg.bins, cfg.peer_pairs)
                rows.append(row)
                print(format_row(row), flush=True)
            _compare(rows, n, d)
    return rows


def _compare(rows: list[dict], n: int, d: int) -> None:
    """AUC difference of ours to scikit-learn's exact AUC over the same store (where both ran in full)."""
    mine = [r for r in rows if r["n"] == n and r["d"] == d]
    for r in mine:
        metric = "cosine" if "cosine" in r["method"] else "l2"
        ref = [
            s for s in mine if s["method"].startswith("scikit") and ("cosine" in s["method"]) == (metric == "cosine")
        ]
        if ref and np.isfinite(ref[0]["auc"]) and r["method"].startswith("ours"):
            r["auc_minus_sklearn"] = r["auc"] - ref[0]["auc"]
            if r["n_positive"] != ref[0]["n_positive"]:
                r["note"] += f" (n_positive differs from scikit-learn's {ref[0]['n_positive']}!)"


def format_row(r: dict) -> str:
    rate = r["pairs"] / r["seconds"]
    diff = r.get("auc_minus_sklearn")
    split = "| | | "
    if "products" in r:
        blas = f" of {r['blas_gflops']:.0f}" if "blas_gflops" in r else ""
        split = f"| {r['products']:.3f} | {r['gflops']:.0f}{blas} | {r['counting']:.3f} "
    return (
        f"| {r['n']:,} x {r['d']} | {r['method']} | {r['seconds']:.3f} | {rate:.3g} | {r['seconds'] / r['floor']:.2f} "
        f"{split}| {r['peak_mb']:.0f} | {r['auc']:.6f} | {'' if diff is None else f'{diff:+.1e}'} | {r['note']} |"
    )


def format_table(rows: list[dict]) -> str:
    head = (
        "| store | method | seconds | pairs/s | x floor | products s | products GFLOP/s of BLAS's | counting s "
        "| peak RSS MB | AUC | AUC - sklearn | note |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    floors = sorted({(r["n"], r["d"], r["floor"]) for r in rows if r["method"] == "ours l2"})
    foot = "\n".join(f"\nfloor {n:,} x {d}: {f:.3f} s (measured in each method's own process)" for n, d, f in floors)
    kernels = sorted({r["blas"] for r in rows if r.get("blas")})
    foot += "".join(f"\nBLAS libraries of a method process: {k}" for k in kernels)
    if any("products" in r for r in rows):
        foot += (
            "\nproducts s, counting s: the tiles' BLAS products and the counting of their values (bins, same-person "
            "pairs, exact tail, group counts), seconds summed over the product threads (median of the calls); "
            "products GFLOP/s per thread of NumPy's BLAS's single-threaded rate on the same block shape, timed in the "
            "same process (FAISS: its squared distances on the same blocks, per thread, beside no reference rate; "
            "`cli.py bench machine` gives its OpenBLAS's)"
        )
    return "\n".join([head, *(format_row(r) for r in rows)]) + "\n" + foot + "\n"


@click.command("score")
@click.option(
    "--sizes", default="3708x1000,100000x128", show_default=True, help="Comma-separated NxD random stores to score."
)
@click.option("--peers/--no-peers", default=True, show_default=True, help="Also time the alternatives a user has.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Where the random stores go (temp).")
def command(sizes: str, peers: bool, device: str, workdir: Path | None) -> None:
    """All-pairs scoring: pairs/s, ratio to the floor measured in the same process, peers, peak memory."""
    shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(","))
    click.echo(format_table(run_bench(BenchScoreConfig(sizes=shapes, peers=peers, device=device, workdir=workdir))))


if __name__ == "__main__":
    command()
