"""Reading score files: `score --scores FILE` on a generated bob4 file against `pandas.read_csv` on the same file,
in one run; the whole command's time and peak resident memory against `cli.py --help`'s; its AUC against
scikit-learn's on the same scores.

    python -m benchmarks.bench_scorefiles --lines 10000000 --work /tmp/sfbench

The file (`id<a> id<b> img<k> score`, 10% same-person lines, scores written by `repr`) is written once into
`--work` and reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_bob4(path: Path, lines: int, seed: int = 0, block: int = 500_000) -> Path:
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        for s in range(0, lines, block):
            n = min(block, lines - s)
            same = rng.random(n) < 0.1
            v = (rng.normal(0, 1, n) + 2 * same).tolist()
            a = rng.integers(0, 50_000, n)
            b = np.where(same, a, rng.integers(0, 50_000, n))
            f.write("".join(f"id{x} id{y} img{s + k} {z!r}\n"
                            for k, (x, y, z) in enumerate(zip(a.tolist(), b.tolist(), v, strict=True))))  # fmt: skip
    tmp.rename(path)
    return path


def with_bad_line(path: Path, line: int) -> Path:
    """A copy of `path` whose line `line` has a fifth field."""
    bad = path.with_name(f"bad{line}_{path.name}")
    if not bad.is_file():
        with open(path, "rb") as f, open(bad, "wb") as g:
            for k, ln in enumerate(f, 1):
                g.write(ln.replace(b"\n", b" extra\n") if k == line else ln)
    return bad


def peak_mib(*args: str, expect: int = 0) -> tuple[float, float, str]:
    """(peak resident MiB of the process and its block parsers together, sampled every 20 ms, wall seconds, stdout
    and stderr) of `cli.py ARGS`."""
    import psutil

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([sys.executable, "cli.py", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        proc, peak = psutil.Process(p.pid), 0
        while p.poll() is None:
            try:
                peak = max(peak, sum(q.memory_info().rss for q in (proc, *proc.children(recursive=True))))
            except psutil.Error:  # a parser that ended meanwhile
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out.seek(0)
        said = out.read()
    if p.returncode != expect:
        raise SystemExit(f"cli.py {' '.join(args)} exited {p.returncode}:\n{said[-2000:]}")
    return peak / 2**20, wall, said


def read_seconds(path: Path) -> dict:
    from pipeline.metrics.intervals import GROUPS
    from pipeline.scoring.scorefiles import read_score_file

    t0 = time.perf_counter()
    sf = read_score_file(path, "bob4", groups=GROUPS)  # as score --scores reads it: identities hashed too
    out = {"ours": time.perf_counter() - t0}
    try:
        import pandas as pd
    except ImportError:
        out["pandas"] = float("nan")
    else:
        t0 = time.perf_counter()
        pd.read_csv(path, sep=r"\s+", header=None, comment="#")
        out["pandas"] = time.perf_counter() - t0
    from sklearn.metrics import roc_auc_score

    out["sklearn_auc"] = float(roc_auc_score(sf.same, sf.values))
    return out


@click.command("scorefiles")
@click.option("--lines", type=int, default=10_000_000, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Folder for the file (default: temp).")
def command(lines: int, work: Path | None) -> None:
    """score --scores on a bob4 file against pandas.read_csv, with its peak memory."""
    work = Path(work or tempfile.mkdtemp(prefix="bench_scorefiles."))
    work.mkdir(parents=True, exist_ok=True)
    path = write_bob4(work / f"scores_{lines}.bob4", lines)
    r = read_seconds(path)
    base, _, _ = peak_mib("--help")
    rss, wall, _ = peak_mib("score", "--scores", str(path), "--out", str(work / "out"), "--overwrite")
    m = json.loads((work / "out" / "metrics.json").read_text())
    click.echo(f"{lines:,} lines, {path.stat().st_size / 2**20:.0f} MiB\n")
    click.echo("| what | seconds | / pandas |\n| --- | ---: | ---: |")
    click.echo(f"| read_score_file (bob4) | {r['ours']:.2f} | {r['ours'] / r['pandas']:.2f} |")
    click.echo(f"| pandas.read_csv(sep=r'\\s+') | {r['pandas']:.2f} | 1.00 |")
    click.echo(f"| cli.py score --scores (whole command) | {wall:.2f} | {wall / r['pandas']:.2f} |\n")
    click.echo(f"peak resident memory: score --scores {rss:.0f} MiB, cli.py --help {base:.0f} MiB, "
               f"above it {rss - base:.0f} MiB")  # fmt: skip
    click.echo(f"AUC {m['auc']!r}, scikit-learn {r['sklearn_auc']!r}, difference {m['auc'] - r['sklearn_auc']:.1e}")
    bad_at = min(1_234_567, lines)
    _, _, said = peak_mib("score", "--scores", str(with_bad_line(path, bad_at)), "--out", str(work / "bad"), expect=2)
    errors = [ln for ln in said.splitlines() if ln.startswith("error:")]
    click.echo(f"a bad line at line {bad_at:,}: exit 2, {errors[0] if errors else 'no error line'}")


if __name__ == "__main__":
    command()
