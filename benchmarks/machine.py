"""What the CPU path of scoring costs on this machine, measured now: NumPy's BLAS (which library and kernels it
chose) multiplying the scoring's canonical 512 x 512 blocks (inner dimension 256) single-threaded, and the first
touch of fresh memory against a second touch. Prints a table; `python -m benchmarks.machine` (= `cli.py bench
machine`); run it with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` too to see NumPy's own kernel choice."""

from __future__ import annotations

import time

import click
import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.bench_score import blas_kernels


def gemm_gflops(side: int = 512, k: int = 256, repeats: int = 100) -> float:
    """Best of 5 rounds of `repeats` single-threaded float32 products [side, k] x [k, side]."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((side, k), dtype=np.float32), rng.standard_normal((side, k), dtype=np.float32)
    out = np.empty((side, side), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(1, user_api="blas"):
        for _ in range(10):
            np.matmul(a, b.T, out=out)
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeats):
                np.matmul(a, b.T, out=out)
            best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * side * side * k / best / 1e9


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
def command(mb: int) -> None:
    """NumPy's BLAS kernels and their GEMM rate, and the cost of fresh memory, on this machine now."""
    first, second = first_touch_ms(mb)
    click.echo("| measure | value |\n| --- | --- |")
    click.echo(f"| NumPy's BLAS | {blas_kernels()} |")
    click.echo(f"| single-threaded 512 x 512 x 256 float32 product | {gemm_gflops():.0f} GFLOP/s |")
    click.echo(f"| first touch of a new {mb} MB array | {first:.1f} ms ({first / mb:.2f} ms per MB) |")
    click.echo(f"| second touch | {second:.1f} ms |")


if __name__ == "__main__":
    command()
