"""`cli.py compare A B`: two results folders (or stores, scored here first) on the same pairs, compared with paired
intervals and p-values (`pipeline.report.compare`, `pipeline.metrics.paired`)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click


@contextlib.contextmanager
def scored(path: Path, metric: str, seed: int) -> Iterator[Path]:
    """`path` when it is a folder; a store scored into a temporary results folder with score's defaults (its listed
    pairs when it lists pairs, else all pairs; `metric`), removed afterwards (its own files only)."""
    if path.is_dir() or not path.is_file():
        yield path
        return
    from pipeline.outputs import remove_own_files
    from pipeline.report.results import RESULT_FILES
    from pipeline.scoring.config import ScoreConfig
    from pipeline.scoring.stage import score
    from pipeline.store.layout import open_store

    with open_store(path, need_labels=False) as store:
        lists = "pairs" in store.file
    tmp = Path(tempfile.mkdtemp(prefix="compare."))
    out = tmp / path.stem
    try:
        score(ScoreConfig(store=path, out=out, all_pairs=not lists, metric=metric, seed=seed, progress=False))
        yield out
    finally:
        if out.is_dir():
            remove_own_files(out, RESULT_FILES)
        with contextlib.suppress(OSError):
            tmp.rmdir()


@click.command()
@click.argument("a", type=click.Path(path_type=Path, exists=True))
@click.argument("b", type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for comparison.json [default: print only].")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the paired bootstrap (listed pairs).")
@click.option("--metric", type=click.Choice(["l2", "cosine"]), default="l2", show_default=True,
              help="How A or B is scored when it is a store (score's defaults otherwise).")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (only one compare wrote).")
def compare(a: Path, b: Path, out: Path | None, seed: int, metric: str, overwrite: bool) -> None:
    """Is B better than A? Two results folders of `score` (or stores, scored here) on the same pairs: B - A of AUC,
    EER and TAR at each FAR with a paired 95% interval and p-value (all pairs: a paired jackknife over identity
    groups; listed pairs: a paired bootstrap over the pairs, and DeLong's test of AUC). Different pairs: exit 2."""
    from pipeline.report.compare import (
        check_comparison_out,
        comparison_table,
        read_scored,
        write_comparison,
    )
    from pipeline.report.compare import compare as run_compare

    if out is not None:
        check_comparison_out(out, [a, b], overwrite)
    with scored(a, metric, seed) as fa, scored(b, metric, seed) as fb:
        result = run_compare(read_scored(fa), read_scored(fb), seed=seed)
    if a.is_file() or b.is_file():  # the temporary folders are gone: name what was given
        result.update(a=str(a.resolve()), b=str(b.resolve()))
    click.echo(comparison_table(result), nl=False)
    if out is not None:
        write_comparison(out, result, [a, b], overwrite)
        click.echo(f"-> {out / 'comparison.json'}")
