"""`score`'s options for score files: `--scores FILE --format F` (another system's scores in place of a store) and
`--export bob4|csv` (the scores of listed pairs written into the results folder)."""

from __future__ import annotations

from pathlib import Path

import click

FORMATS = ("bob4", "bob5", "bobcsv", "pyeer", "csv")


def score_file_options(f):
    f = click.option("--export", type=click.Choice(["bob4", "csv"]), default=None,
                     help="Also write the scores of the listed pairs (--pairs) into the results folder at full "
                          "precision: scores.bob4 or scores.csv.")(f)  # fmt: skip
    f = click.option("--impostor-scores", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="With --format pyeer: the impostor (different-person) scores; --scores holds the genuine "
                          "ones.")(f)  # fmt: skip
    f = click.option("--format", "score_format", type=click.Choice(FORMATS), default="bob4", show_default=True,
                     help="Of --scores: bob4 (claimed_id real_id test_label score), bob5 (claimed_id model_label "
                          "real_id test_label score), bobcsv (header with bio_ref_subject_id, probe_subject_id, "
                          "score), pyeer (one score per line, genuine and impostor files), csv (header with score, "
                          "same and optionally a, b). Higher scores: more alike. .gz files too.")(f)  # fmt: skip
    return click.option("--scores", type=click.Path(path_type=Path, dir_okay=False), default=None,
                        help="Score another system's scores (a file) in place of a store: the same metrics.json, "
                             "figures and report.")(f)  # fmt: skip


def check_inputs(store: Path | None, mode: str | None, scores: Path | None) -> None:
    """A store with --all-pairs or --pairs, or --scores FILE: exactly one."""
    if scores is not None:
        if store is not None or mode is not None:
            raise click.UsageError("--scores FILE replaces STORE, --all-pairs and --pairs: give one or the other")
        return
    if store is None:
        raise click.UsageError("give a STORE (with --all-pairs or --pairs) or --scores FILE")
    if mode is None:
        raise click.UsageError("choose --all-pairs or --pairs")
