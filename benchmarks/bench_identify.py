"""Open-set identification at scale: `identify` of a labelled store with distractors, against FAISS's exact flat
search (`IndexFlatIP`, k = max rank, the same probes against the same gallery, float32) and the matrix product
of the same shape, in one run; its peak resident memory; and, with `--check-splits`, 3 `--rows` parts merged and
2 torchrun ranks giving the same metrics.json.

    python -m benchmarks.bench_identify --n 14000 --people 2000 --enrol 1000 --distractors 2000000
    python -m benchmarks.bench_identify --distractors 200000 --signal 0.5   # mates buried among distractors

Stores: a probe store (identity centre * signal + noise, `--people` identities, labels sorted) and a float16
distractor store (each row its own identity, the same model), written block by block into `--work`, reused when
there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IGNORED = ("config", "provenance", "store", "parts", "world_size", "n_tiles", "label", "backend", "ranges", "rows")


def write_store(path: Path, n: int, d: int, people: int, signal: float, seed: int, dtype: str,
                block: int = 1 << 16) -> Path:  # fmt: skip
    """n rows of `people` identities (labels sorted; people=0: each row its own), centre * signal + noise."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    labels = np.arange(n) if people == 0 else np.sort(rng.integers(0, people, size=n))
    centres = rng.standard_normal((people or 1, d)).astype(np.float32)
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        emb = f.create_dataset("embeddings", (n, d), dtype=dtype, chunks=(min(n, 4096), d))
        f.create_dataset("labels", data=labels)
        for s in range(0, n, block):
            e = min(s + block, n)
            c = rng.standard_normal((e - s, d), dtype=np.float32) if people == 0 else centres[labels[s:e]]
            emb[s:e] = (signal * c + rng.standard_normal((e - s, d), dtype=np.float32)).astype(dtype)
        f.attrs["model"] = "random"
    tmp.rename(path)
    return path


def identify(store: Path, distractors: Path, out: Path, enrol: int, *extra: str, nproc: int = 1) -> tuple[dict, float]:
    """(metrics or part.json, peak resident MiB) of one `identify` process (or torchrun with `nproc` ranks)."""
    cmd = [sys.executable, "cli.py"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "cli.py"]
    cmd = ["/usr/bin/time", "-v", *cmd, "identify", str(store), "--distractors", str(distractors),
           "--gallery-people", str(enrol), "--trials", "1", "--out", str(out), "--no-progress", "--overwrite", *extra]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"identify failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    name = "metrics.json" if (out / "metrics.json").is_file() else "part.json"
    return json.loads((out / name).read_text()), rss


def operands(store: Path, distractors: Path, split: Path) -> tuple[np.ndarray, np.ndarray]:
    """The trial's probes and gallery (enrolled images, then distractors) as unit float32 rows."""
    lines = np.loadtxt(split, delimiter=",", skiprows=1, dtype=str)
    rows, roles = lines[:, 1].astype(np.int64), lines[:, 2]
    with h5py.File(store, "r") as f:
        x = f["embeddings"][...].astype(np.float32)
    with h5py.File(distractors, "r") as f:
        gallery = np.concatenate([x[np.sort(rows[roles == "gallery"])], f["embeddings"][...].astype(np.float32)])
    probes = x[np.sort(rows[roles != "gallery"])]
    for a in (probes, gallery):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
    return probes, gallery


def faiss_seconds(probes: np.ndarray, gallery: np.ndarray, k: int) -> float:
    """FAISS's exact search, its OpenBLAS on current kernels as the scoring imports it."""
    from pipeline.scoring.faiss_blas import import_faiss

    faiss = import_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    t0 = time.perf_counter()
    index.search(probes, k)
    return time.perf_counter() - t0


def product_seconds(m: int, n: int, d: int, repeats: int = 5) -> float:
    """The float32 product of an m x d by a d x n matrix (NumPy's BLAS, all threads), from the fastest of
    `repeats` 4096 x 4096 pieces (the floor: the lowest time is the least disturbed)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4096, d), dtype=np.float32), rng.standard_normal((4096, d), dtype=np.float32)
    out = np.empty((4096, 4096), np.float32)
    np.matmul(a, b.T, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b.T, out=out)
        times.append(time.perf_counter() - t0)
    return min(times) / 4096**2 * m * n


def same(a: dict, b: dict) -> list[str]:
    """Keys whose values differ, timings and run descriptions aside."""
    keys = (set(a) | set(b)) - set(IGNORED)
    return sorted(k for k in keys if not k.startswith("seconds") and a.get(k) != b.get(k))


def split_runs(store: Path, distractors: Path, work: Path, enrol: int, whole: dict) -> dict:
    """3 `--rows` parts merged, and 2 torchrun ranks: their metrics.json against the whole run's."""
    g = whole["gallery_rows"]
    cuts = [0, g // 7 + 13, g // 2 + 101, g]
    parts = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        identify(store, distractors, work / f"part{a}", enrol, "--rows", f"{a}:{b}")
        parts.append(str(work / f"part{a}"))
    subprocess.run([sys.executable, "cli.py", "merge", *parts[::-1], "--out", str(work / "merged"), "--overwrite"],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    merged = json.loads((work / "merged" / "metrics.json").read_text())
    ranks, _ = identify(store, distractors, work / "ranks", enrol, nproc=2)
    return {"parts_differ": same(whole, merged), "ranks_differ": same(whole, ranks)}


def table(r: dict) -> str:
    rows = [
        ("identify (metrics.json seconds)", r["seconds"], r["seconds"] / r["faiss"], r["seconds"] / r["product"]),
        ("FAISS IndexFlatIP search, k = max rank", r["faiss"], 1.0, r["faiss"] / r["product"]),
        ("matrix product of the same shape", r["product"], r["product"] / r["faiss"], 1.0),
    ]
    lines = [f"probes {r['probes']:,} x gallery {r['gallery']:,} x {r['dim']}, max rank {r['max_rank']}; "
             f"peak resident memory of identify {r['rss_mib']:.0f} MiB", "",
             "| what | seconds | / FAISS | / product |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {name} | {s:.2f} | {a:.2f} | {b:.2f} |" for name, s, a, b in rows]
    return "\n".join(lines)


@click.command("identify")
@click.option("--n", type=int, default=14_000, show_default=True, help="Rows of the probe store.")
@click.option("--people", type=int, default=2_000, show_default=True, help="Identities of the probe store.")
@click.option("--enrol", type=int, default=1_000, show_default=True, help="People enrolled (one image each).")
@click.option("--distractors", "n_distractors", type=int, default=2_000_000, show_default=True)
@click.option("--dim", type=int, default=128, show_default=True)
@click.option("--signal", type=float, default=1.0, show_default=True,
              help="Identity signal (1.0: mates well above most distractors; 0.5: buried among them).")  # fmt: skip
@click.option("--check-splits", is_flag=True, help="Also 3 --rows parts merged and 2 torchrun ranks.")
@click.option("--skip-faiss", is_flag=True, help="No FAISS comparison (it holds the gallery in memory).")
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Folder for stores (default: temp).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON here.")
def command(n, people, enrol, n_distractors, dim, signal, check_splits, skip_faiss, work, out) -> None:
    """identify with distractors against FAISS's exact flat search and the matrix product, in one run."""
    work = Path(work or tempfile.mkdtemp(prefix="bench_identify."))
    work.mkdir(parents=True, exist_ok=True)
    store = write_store(work / f"probes_{n}x{dim}_{people}_{signal}.h5", n, dim, people, signal, 1, "float32")
    dist = write_store(work / f"distractors_{n_distractors}x{dim}_{signal}.h5", n_distractors, dim, 0, signal, 2,
                       "float16")  # fmt: skip
    before = product_seconds(n, n_distractors + enrol, dim)
    m, rss = identify(store, dist, work / "whole", enrol)
    curve = [p["rank1"] for p in m.get("distractor_curve", [])]
    r = {"probes": m["n_probes"], "gallery": m["gallery_rows"], "dim": dim, "max_rank": m["max_rank"],
         "seconds": m["seconds"], "rss_mib": rss, "rank1": m["cmc"][0], "fnir_at_fpir_0.01": m["fnir_at_fpir"]["0.01"],
         "distractor_curve": m.get("distractor_curve"), "rank1_never_rises": bool(np.all(np.diff(curve) <= 0)),
         "cpu_threads": os.cpu_count()}  # fmt: skip
    if not skip_faiss:
        probes, gallery = operands(store, dist, work / "whole" / "split.csv")
        r["faiss"] = faiss_seconds(probes, gallery, m["max_rank"])
        del probes, gallery
    else:
        r["faiss"] = float("nan")
    r["product"] = min(before * r["probes"] / n, product_seconds(r["probes"], r["gallery"], dim))  # before and after
    if check_splits:
        r.update(split_runs(store, dist, work, enrol, m))
    click.echo(table(r))
    click.echo(f"rank 1 {r['rank1']:.4f}, FNIR at FPIR 0.01 {r['fnir_at_fpir_0.01']:.4f}; rank 1 against distractors "
               f"never rises: {r['rank1_never_rises']}; {json.dumps(r.get('distractor_curve'))}")  # fmt: skip
    for k in ("parts_differ", "ranks_differ"):
        if k in r:
            click.echo(f"{k.replace('_', ' ')} from the whole run in: {r[k] or 'nothing'}")
    if out:
        Path(out).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    command()
