"""`cli.py identify`: open-set 1:N identification of a store's probes against its enrolled people (and
distractors). Parses options into an `IdentifyConfig` and calls the stage (`pipeline.identify.stage`)."""

from __future__ import annotations

import os
from pathlib import Path

import click


class Several(click.Option):
    """An option that takes one or more values after one flag (`--distractors A B`) and may be repeated
    (`--distractors A --distractors B`): the values up to the next option are its. It hooks click's parser (its
    `_long_opt` table); where that is missing it is a plain repeatable option."""

    def add_to_parser(self, parser, ctx) -> None:
        super().add_to_parser(parser, ctx)
        table = getattr(parser, "_long_opt", {})
        prefixes = tuple(getattr(parser, "_opt_prefixes", {"-", "--"}))
        for name in self.opts:
            opt = table.get(name)
            if opt is None:
                continue
            one = opt.process

            def process(value, state, one=one) -> None:
                values = [value]
                while state.rargs and not state.rargs[0].startswith(prefixes):
                    values.append(state.rargs.pop(0))
                for v in values:
                    one(v, state)

            opt.process = process


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Results folder (metrics.json, split.csv, searches.csv, cmc.png, iet.png); with --rows a part "
                   "folder for `merge`.")  # fmt: skip
@click.option("--distractors", multiple=True, type=click.Path(path_type=Path), cls=Several, metavar="STORE...",
              help="Stores whose rows join every gallery, each an identity of its own (MegaFace's distractors): "
                   "`--distractors A B` or `--distractors A --distractors B` (after STORE). Read in chunks: any "
                   "size.")  # fmt: skip
@click.option("--gallery-people", type=int, default=None,
              help="People enrolled per trial, among those with at least K+1 images [default: half of them].")  # fmt: skip
@click.option("--gallery-images", type=int, default=1, show_default=True, metavar="K",
              help="Images enrolled per person; their other images are mated probes.")  # fmt: skip
@click.option("--trials", type=int, default=10, show_default=True, help="Random splits, averaged.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits and the bootstrap.")
@click.option("--split", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Your own trials: a split.csv (trial,row,role; role gallery, mated or nonmated) as identify "
                   "writes it; replaces --gallery-people/--gallery-images/--trials.")  # fmt: skip
@click.option("--template", type=click.Choice(["best", "mean"]), default="best", show_default=True,
              help="A person's score: the best over their gallery images, or that of their mean unit-length "
                   "embedding (cosine only).")  # fmt: skip
@click.option("--max-rank", type=int, default=50, show_default=True, help="Ranks of the CMC.")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine", show_default=True,
              help="cosine (minus the stores' score offsets, as score computes it) or l2 (squared distance).")  # fmt: skip
@click.option("--rows", default=None, metavar="A:B",
              help="Search only the span A:B of each trial's gallery (enrolled images in identity order, then the "
                   "distractors in store order) into a part folder; join the parts with `merge`.")  # fmt: skip
@click.option("--no-score-norm", "score_norm", flag_value=False, default=True,
              help="Ignore the stores' score offsets (cohort normalisation): plain cosines.")  # fmt: skip
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="cpu: NumPy's BLAS in fixed blocks (the same bits however the work is split); cuda: torch on the "
                   "GPU (full float32 products).")  # fmt: skip
@click.option("--label", default=None, help="Name of this result in legends and tables.")
@click.option("--overwrite", is_flag=True, help="Replace an existing results folder (only one identify wrote).")
@click.option("--no-progress", "progress", flag_value=False, default=True, help="No progress bar.")
def identify(rows: str | None, distractors: tuple[Path, ...], **options) -> None:
    """Open-set identification: CMC, FNIR at FPIR and DIR at FAR of probes searched against enrolled people,
    exact, averaged over seeded trials (BLUFR's layout), with distractors at any scale (docs/identification.md)."""
    from pipeline.identify.config import IdentifyConfig
    from pipeline.identify.stage import identify as run_identify
    from pipeline.scoring.config import parse_rows

    try:
        span = None if rows is None else parse_rows(rows)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rows") from None
    m = run_identify(IdentifyConfig(rows=span, distractors=distractors, **options))
    if os.environ.get("RANK", "0") != "0":
        return
    if "cmc" not in m:
        click.echo(f"gallery rows {m['rows'][0]}:{m['rows'][1]} of {m['gallery_rows']}, {m['seconds']:.2f} s "
                   f"-> {options['out']} (merge the parts)")  # fmt: skip
        return
    click.echo(
        f"rank 1 {m['cmc'][0]:.4f}, FNIR at FPIR 0.01 {m['fnir_at_fpir']['0.01']:.4f}, DIR at FAR 1% "
        f"{m['dir_at_far']['0.01']:.4f} over {m['n_trials']} trials ({m['n_mated']:.0f} mated, "
        f"{m['n_nonmated']:.0f} non-mated searches, {m['n_distractors']} distractors), {m['seconds']:.2f} s "
        f"-> {options['out']}"
    )


def merge_identify_parts(options: dict) -> None:
    """`merge` of `identify --rows A:B` parts (`merge`'s options), and what it prints."""
    from pipeline.identify.merge import merge_identify

    m = merge_identify(list(options["parts"]), options["out"], options["overwrite"])
    if "cmc" in m:
        click.echo(f"rank 1 {m['cmc'][0]:.4f}, FNIR at FPIR 0.01 {m['fnir_at_fpir']['0.01']:.4f} from "
                   f"{m['parts']} parts -> {options['out']}")  # fmt: skip
    else:
        click.echo(f"gallery rows {m['ranges']} of {m['gallery_rows']} (partial) -> {options['out']}")
