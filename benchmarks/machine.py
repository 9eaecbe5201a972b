"""What the CPU path of scoring costs on this machine, measured now: NumPy's BLAS (which library and kernels it
chose) multiplying the scoring's canonical 512 x 512 blocks (inner dimension 256) single-threaded, the same for
FAISS's own OpenBLAS (`--backend faiss`) as a plain `import faiss` loads it and as the scoring imports it
(`pipeline.scoring.faiss_blas`), and the first touch of fresh memory against a second touch. Prints a table;
`python -m benchmarks.machine` (= `cli.py bench machine`); run it with `env -u OPENBLAS_CORETYPE -u
OPENBLAS_L2_SIZE` too to see NumPy's own kernel choice."""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.bench_score import blas_kernels
from pipeline.scoring.faiss_blas import import_faiss, loaded_kernels

Product = Callable[[np.ndarray, np.ndarray, np.ndarray], object]  # (a, b, out): out = a @ b.T
WIDE = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # the flags that decide kernels and bf16 speed


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it (model name, family and model: "AMD EPYC" alone names no generation), its
    logical CPUs here and its widest vector flags; `platform.processor()` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    first = dict(
        (k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in text.split("\n\n")[0].splitlines() if ":" in ln)
    )
    flags = set(first.get("flags", "").split())
    return (f"{first.get('model name', '?')}, family {first.get('cpu family', '?')} model {first.get('model', '?')}, "
            f"{os.cpu_count()} logical CPUs, {' '.join(f for f in WIDE if f in flags) or 'no AVX2'}")  # fmt: skip


def gemm_gflops(side: int = 512, k: int = 256, repeats: int = 100, product: Product | None = None) -> float:
    """Best of 5 rounds of `repeats` single-threaded float32 products [side, k] x [k, side] (NumPy's by default)."""
    product = product or (lambda a, b, out: np.matmul(a, b.T, out=out))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((side, k), dtype=np.float32), rng.standard_normal((side, k), dtype=np.float32)
    out = np.empty((side, side), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(1):  # OpenMP too: an OpenMP OpenBLAS (FAISS's) follows its thread count
        for _ in range(10):
            product(a, b, out)
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeats):
                product(a, b, out)
            best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * side * side * k / best / 1e9


def cblas_product(path: str) -> Product:
    """`out = a @ b.T` by `cblas_sgemm` of the OpenBLAS at `path` (the copy already loaded, if it is)."""
    sgemm = ctypes.CDLL(path).cblas_sgemm
    f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    sgemm.restype = None

    def product(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        (m, k), n = a.shape, b.shape[0]  # row-major (101), a not transposed (111), b transposed (112)
        sgemm(101, 111, 112, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, k, 0.0, out.ctypes.data, n)

    return product


def faiss_probe(loader: bool) -> str:
    """FAISS's OpenBLAS, imported through `import_faiss` or plainly (as a user's script loads it) in this
    process: its kernel family and single-threaded rate, or why there is none."""
    try:
        faiss = import_faiss() if loader else importlib.import_module("faiss")
    except ImportError:
        return "faiss not installed"
    kernels = loaded_kernels(faiss)
    if kernels is None:
        return "no OpenBLAS of its own"
    note = "" if kernels.current else ", older than this CPU"
    rate = gemm_gflops(product=cblas_product(kernels.path))
    return f"{kernels.family} ({kernels.config.split(' DYNAMIC')[0]}{note}), {rate:.0f} GFLOP/s"


def faiss_rows() -> list[tuple[str, str]]:
    """FAISS's OpenBLAS as a plain `import faiss` loads it and as the scoring does, each in a fresh process
    (a process loads it once)."""
    rows = []
    for how, flag in (
        ("plain `import faiss`", "--faiss-probe=plain"),
        ("the scoring's import", "--faiss-probe=loader"),
    ):
        cmd = [sys.executable, "-m", "benchmarks.machine", flag]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], env=os.environ)
        rows.append((f"FAISS's OpenBLAS, {how}", r.stdout.strip() or r.stderr.strip().splitlines()[-1]))
    return rows


def first_touch_ms(mb: int) -> tuple[float, float]:
    """Milliseconds to write `mb` MB of a new array the first time and the second time."""
    x = np.empty(mb << 18, dtype=np.float32)
    t = time.perf_counter()
    x[:] = 1
    first = time.perf_counter() - t
    t = time.perf_counter()
    x[:] = 2
    return first * 1e3, (time.perf_counter() - t) * 1e3


@click.command("machine")
@click.option("--mb", type=int, default=16, show_default=True, help="Size of the fresh array.")
@click.option("--faiss-probe", "probe", type=click.Choice(["plain", "loader"]), default=None, hidden=True)
def command(mb: int, probe: str | None) -> None:
    """NumPy's and FAISS's BLAS kernels and their GEMM rates, and the cost of fresh memory, on this machine now."""
    if probe:  # one line for `faiss_rows`
        click.echo(faiss_probe(probe == "loader"))
        return
    first, second = first_touch_ms(mb)
    click.echo("| measure | value |\n| --- | --- |")
    click.echo(f"| CPU | {cpu_name()} |")
    click.echo(f"| OPENBLAS_CORETYPE | {os.environ.get('OPENBLAS_CORETYPE', '(not set)')} |")
    click.echo(f"| NumPy's BLAS | {blas_kernels()} |")
    click.echo(f"| single-threaded 512 x 512 x 256 float32 product | {gemm_gflops():.0f} GFLOP/s |")
    for name, value in faiss_rows():
        click.echo(f"| {name}: kernels, same product | {value} |")
    click.echo(f"| first touch of a new {mb} MB array | {first:.1f} ms ({first / mb:.2f} ms per MB) |")
    click.echo(f"| second touch | {second:.1f} ms |")


if __name__ == "__main__":
    command()
