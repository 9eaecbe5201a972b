"""The project's figures against pyeer's and bob.measure's on the same score files (`score --scores`): AUC, EER,
FNMR at FMR, and whether every (FMR, FNMR) point the two libraries report lies on the project's ROC.

    python cli.py bench oracles FILE --format bob4 [--oracle-python /path/to/venv/bin/python]

The oracles run in `--oracle-python` (default: this Python), `benchmarks/oracle_figures.py` on the file's genuine
and impostor scores written one per line: bob.measure 6.1 pins numpy 1.26, so it usually has a venv of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from pipeline.metrics.curve import exact_counts
from pipeline.metrics.intervals import GROUPS
from pipeline.scoring.file_metrics import file_metrics
from pipeline.scoring.scorefiles import FORMATS, read_blocks, read_score_file

LEVELS = (1e-3, 1e-2, 1e-1)


def our_points(genuine: np.ndarray, impostor: np.ndarray) -> set[tuple[int, int]]:
    """(false matches, false non-matches) of every threshold (accept score >= t): above every score, and at each
    distinct score."""
    v = np.r_[genuine, impostor]
    pos, neg, _ = exact_counts(v, np.arange(len(v)) < len(genuine), "cosine")
    fm, fnm = np.r_[0, np.cumsum(neg)], len(genuine) - np.r_[0, np.cumsum(pos)]
    return set(zip(fm.tolist(), fnm.tolist(), strict=True))


def oracles(genuine: np.ndarray, impostor: np.ndarray, python: str, work: Path) -> dict:
    g, i = work / "genuine.txt", work / "impostor.txt"
    for path, v in ((g, genuine), (i, impostor)):
        path.write_text("".join(f"{x!r}\n" for x in v.tolist()))
    script = Path(__file__).with_name("oracle_figures.py")
    p = subprocess.run([python, str(script), str(g), str(i), "--levels", *map(str, LEVELS)], capture_output=True,
                       text=True)  # fmt: skip
    if p.returncode:
        raise SystemExit(f"{python} {script.name} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def rows(path: Path, fmt: str, impostor: Path | None, python: str) -> list[str]:
    _, m, _ = file_metrics(lambda: read_blocks(path, fmt, impostor, groups=GROUPS), str(path), 4096, 0)
    sf = read_score_file(path, fmt, impostor)
    genuine, impostor_v = sf.values[sf.same], sf.values[~sf.same]
    with tempfile.TemporaryDirectory() as work:
        theirs = oracles(genuine, impostor_v, python, Path(work))
    points = our_points(genuine, impostor_v)
    name = f"{path.name} ({len(genuine):,} + {len(impostor_v):,})"
    out = [_row(name, "this project", m["auc"], m["eer"], m["fnmr_at_fmr"], "(its own curve)")]
    for lib, fig in theirs.items():
        if "missing" in fig:
            out.append(f"| {name} | {lib} | not installed: {fig['missing']} |||||||")
            continue
        on = sum(tuple(p) in points for p in fig["points"])
        eer = f"{fig['eer']:.6f}" + (" [{:.6f}, {:.6f}]".format(*fig["eer_interval"]) if "eer_interval" in fig else "")
        out.append(_row(name, lib, fig.get("auc"), eer, fig["fnmr_at_fmr"], f"{on} of {len(fig['points'])}"))
    return out


def _row(name: str, lib: str, auc, eer, fnmr: dict, points: str) -> str:
    auc = "-" if auc is None else f"{auc:.9f}"
    eer = eer if isinstance(eer, str) else f"{eer:.6f}"
    cells = " | ".join("not measurable" if fnmr[f"{f:g}"] is None else f"{fnmr[f'{f:g}']:.6f}" for f in LEVELS)
    return f"| {name} | {lib} | {auc} | {eer} | {cells} | {points} |"


@click.command("oracles")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="bob4", show_default=True)
@click.option("--impostor-scores", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --format pyeer: the impostor list (FILES is then the genuine list).")  # fmt: skip
@click.option("--oracle-python", default=sys.executable, show_default="this Python",
              help="A Python with pyeer and bob.measure installed.")  # fmt: skip
def command(files: tuple[Path, ...], fmt: str, impostor_scores: Path | None, oracle_python: str) -> None:
    """This project's AUC, EER and FNMR at FMR against pyeer's and bob.measure's on the same score files."""
    levels = " | ".join(f"FNMR at FMR {f:g}" for f in LEVELS)
    click.echo(f"| file (genuine + impostor) | library | AUC | EER | {levels} | their points on our ROC |")
    click.echo("| --- | --- | ---: | ---: |" + " ---: |" * len(LEVELS) + " ---: |")
    for path in files:
        for line in rows(path, fmt, impostor_scores, oracle_python):
            click.echo(line)


if __name__ == "__main__":
    command()
