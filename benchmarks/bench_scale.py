"""Scale-out benchmark: `score --all-pairs` by two torchrun ranks against one rank with one thread, on the
same store, interleaved in one run (the ratio counts, not a bare time); optionally the peak memory of an
out-of-core `--rows` part of a large float16 store.

    python -m benchmarks.bench_scale --n 100000 --dim 128 --repeats 2
    python -m benchmarks.bench_scale --memory-n 2000000 --rows 0:2000

Stores are written block by block (sorted by label, as `embed` writes them), never held whole in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_sorted_store(path: Path | str, n: int, d: int, seed: int = 0, dtype: str = "float32",
                       per_id: int = 4, block: int = 1 << 16) -> Path:  # fmt: skip
    """A store of n rows (identity centre * 0.5 + noise), labels sorted, written in blocks of `block` rows."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    n_ids = max(2, n // per_id)
    labels = np.sort(rng.integers(0, n_ids, size=n))
    table = rng.standard_normal((min(n_ids, 1 << 16), d)).astype(np.float32)  # identity centres (recycled)
    with h5py.File(path, "w") as f:
        emb = f.create_dataset("embeddings", (n, d), dtype=dtype, chunks=(min(n, 4096), d))
        f.create_dataset("labels", data=labels)
        for s in range(0, n, block):
            lab = labels[s : s + block]
            x = 0.5 * table[lab % len(table)] + rng.standard_normal((len(lab), d), dtype=np.float32)
            emb[s : s + len(lab)] = x.astype(dtype)
        f.attrs["model"] = "random"
    return path


def _score(store: Path, out: Path, nproc: int, *extra: str) -> tuple[dict, float]:
    env = dict(os.environ)
    if nproc == 1:
        cmd = [sys.executable, "cli.py"]
        env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "cli.py"]
    cmd += ["score", str(store), "--all-pairs", "--out", str(out), "--no-progress", "--overwrite", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return json.loads((out / "metrics.json").read_text()), wall


def speedup(n: int, dim: int, repeats: int, work: Path) -> list[dict]:
    """One rank with one thread vs two torchrun ranks, interleaved `repeats` times."""
    store = write_sorted_store(work / f"scale_{n}x{dim}.h5", n, dim)
    rows = []
    for r in range(repeats):
        for nproc in (1, 2):
            m, wall = _score(store, work / f"out{nproc}", nproc)
            h = np.load(work / f"out{nproc}" / "histogram.npz")
            rows.append(dict(repeat=r, ranks=nproc, seconds=m["seconds"], wall=wall, auc=m["auc"],
                             n_pairs=m["n_pairs"], n_positive=m["n_positive"], world_size=m["world_size"],
                             pos_sum=int(h["pos"].sum()), hist=(h["pos"].tobytes(), h["neg"].tobytes())))  # fmt: skip
    return rows


def peak_memory(n: int, dim: int, rows: str, work: Path) -> dict:
    """Peak resident memory (/usr/bin/time -v) of `score --rows` on an n x dim float16 store."""
    store = write_sorted_store(work / f"big_{n}x{dim}.h5", n, dim, dtype="float16")
    cmd = ["/usr/bin/time", "-v", sys.executable, "cli.py", "score", str(store), "--all-pairs", "--rows", rows,
           "--out", str(work / "rows_part"), "--no-progress", "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    info = json.loads((work / "rows_part" / "part.json").read_text())
    return dict(n=n, dim=dim, rows=rows, store_mb=store.stat().st_size / 2**20, peak_rss_mb=rss_kb / 1024,
                n_pairs=info["n_pairs"], seconds=time.perf_counter() - t0)  # fmt: skip


@click.command("scale")
@click.option("--n", type=int, default=100_000, show_default=True)
@click.option("--dim", type=int, default=128, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True)
@click.option("--memory-n", type=int, default=0, help="Also the --rows peak memory on this many float16 rows.")
@click.option("--rows", default="0:2000", show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Folder for stores (default: temp).")
def command(n: int, dim: int, repeats: int, memory_n: int, rows: str, work: Path | None) -> None:
    """torchrun speed-up (2 ranks against 1) and out-of-core peak memory, on random stores."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale.")) if work is None else Path(work)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if repeats:
            res = speedup(n, dim, repeats, tmp)
            print(f"score --all-pairs, {n} x {dim} float32 ({res[0]['n_pairs']:.3g} pairs), 2 CPU cores")
            print("| repeat | ranks | seconds (metrics.json) | wall s | auc | n_pairs | n_positive | world_size |")
            print("|---|---|---|---|---|---|---|---|")
            for r in res:
                print(f"| {r['repeat']} | {r['ranks']}{' (1 thread)' if r['ranks'] == 1 else ''} | "
                      f"{r['seconds']:.2f} | {r['wall']:.2f} | {r['auc']!r} | {r['n_pairs']} | {r['n_positive']} | "
                      f"{r['world_size']} |")  # fmt: skip
            one = min(r["seconds"] for r in res if r["ranks"] == 1)
            two = min(r["seconds"] for r in res if r["ranks"] == 2)
            one_w = min(r["wall"] for r in res if r["ranks"] == 1)
            two_w = min(r["wall"] for r in res if r["ranks"] == 2)
            same = len({r["hist"] for r in res}) == 1 and len({r["auc"] for r in res}) == 1
            print(f"speed-up 2 ranks / 1 rank: {one / two:.2f}x (scoring seconds), {one_w / two_w:.2f}x (wall); "
                  f"identical histograms and AUC: {same}")  # fmt: skip
        if memory_n:
            m = peak_memory(memory_n, dim, rows, tmp)
            print(f"--rows {m['rows']} of {m['n']} x {m['dim']} float16 ({m['store_mb']:.0f} MB store): "
                  f"peak RSS {m['peak_rss_mb']:.0f} MB, {m['n_pairs']} pairs in {m['seconds']:.1f} s")  # fmt: skip
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    command()
