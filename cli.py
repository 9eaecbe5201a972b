"""Command line: finetune, embed, score, identify, compare, merge, report, run, bench. Each command parses options,
builds its stage's config and calls the stage; library code does the work."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from benchmarks import BenchmarkGroup
from cli_compare import compare
from cli_config import ConfigCommand, config_file_option, stage_kwargs
from cli_identify import identify, merge_identify_parts
from cli_options import (
    device_option,
    embed_options,
    finetune_options,
    network_source_options,
    recipe_notes,
    tta_resizes_option,
    workers_option,
)
from cli_printed import auc_line, echo_not_measurable, echo_scored
from cli_scorefiles import check_inputs, score_file_options
from pipeline.errors import PipelineError


class Group(click.Group):
    """Turns PipelineError and ValueError (bad configuration) into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (PipelineError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            if getattr(e, "hard_exit", False):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            sys.exit(2)
        except OSError as e:  # reading or writing failed (permissions, full disk, ...): the OS says which file
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def _quiet_h5py_excepthook(kind, value, tb) -> None:
    """h5py prints the failure of freeing an object through sys.excepthook: after a failed write that repeats
    what the command reports once, so it goes to the debug log."""
    last = tb
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    if last is not None and "h5py" in last.tb_frame.f_code.co_filename and "dealloc" in last.tb_frame.f_code.co_name:
        logging.getLogger("h5py").debug("ignored while freeing: %s", value)
        return
    sys.__excepthook__(kind, value, tb)


def _quiet_h5py_dealloc(unraisable) -> None:
    """After a failed HDF5 write, h5py's objects fail again as they are freed; the command has reported the
    failure once, so these repeats are logged at debug level. Anything else goes to Python's own hook."""
    if "h5py" in repr(unraisable.object) or "h5py" in str(getattr(unraisable, "err_msg", "")):
        logging.getLogger("h5py").debug("ignored while freeing: %s", unraisable.exc_value)
        return
    sys.__unraisablehook__(unraisable)


@click.group(cls=Group)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Turn ImageNet CNNs into face-verification models and measure them on LFW."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.unraisablehook, sys.excepthook = _quiet_h5py_dealloc, _quiet_h5py_excepthook


def _embed_config() -> tuple[type, ...]:
    from pipeline.embedding.embed import EmbedConfig

    return (EmbedConfig,)


def _finetune_config() -> tuple[type, ...]:
    from pipeline.finetune import FinetuneConfig

    return (FinetuneConfig,)


def _run_config() -> tuple[type, ...]:
    from pipeline.finetune import FinetuneConfig
    from pipeline.run import RunConfig

    return RunConfig, FinetuneConfig


@main.command(cls=ConfigCommand, configs=_embed_config)
@embed_options
@config_file_option
@click.pass_context
def embed(ctx: click.Context, config_file: Path | None, **options) -> None:
    """Embed every image of a face set (LFW protocol split, folder tree, .bin) once into an HDF5 store.

    With a finetune checkpoint that holds a cohort (--cohort-top), the store also gets each image's score offset
    (/score_offsets), which `score` subtracts from the cosines (cohort score normalisation). With a fine-tuned
    checkpoint, an LFW set that holds its training people (View 2: --protocol 10fold) is embedded with a warning
    that says how many."""
    from pipeline.embedding.embed import EmbedConfig
    from pipeline.embedding.embed import embed as run_embed
    from pipeline.finetune.overlap import warn_training_overlap
    from pipeline.nets.models import embed_network_options
    from pipeline.runtime import sigterm_as_interrupt

    values = stage_kwargs(ctx, options, config_file, EmbedConfig)
    values.update(embed_network_options(values["model"], values["weights"], values["layer"], values["input_size"]))
    cfg = EmbedConfig(**values)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 warns
        warn_training_overlap(cfg)
    with sigterm_as_interrupt():
        path = run_embed(cfg)
    click.echo(str(path))


@main.command()
@click.argument("store", type=click.Path(path_type=Path), required=False)
@score_file_options
@click.option("--all-pairs", "mode", flag_value="all-pairs", help="Every unordered pair i < j of the store.")
@click.option("--pairs", "mode", flag_value="pairs", help="The pairs the store lists (embed --protocol pairs|10fold).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Results folder: metrics.json, roc.csv, roc.png, histogram.npz.",
)
@click.option(
    "--metric",
    type=click.Choice(["l2", "cosine"]),
    default="l2",
    show_default=True,
    help="l2: Euclidean distance (the study's); cosine: cosine similarity.",
)
@click.option(
    "--bins",
    type=int,
    default=1 << 18,
    show_default=True,
    help="Histogram bins over the data's score range (more: smaller auc_error_bound).",
)
@click.option("--block", type=int, default=4096, show_default=True, help="Rows per tile side (at most 4096).")
@click.option(
    "--backend",
    type=click.Choice(["torch", "faiss"]),
    default="torch",
    show_default=True,
    help="Tile distances by the default engine (NumPy's BLAS on the CPU, torch on a GPU) or FAISS's squared L2 "
    "distances on the same blocks (cosine stays on the default: FAISS's inner products are NumPy's); torch when "
    "faiss is missing.",
)
@device_option
@click.option(
    "--exact", is_flag=True, help="Also the exact AUC by sorting every score (checking; memory for all pairs)."
)
@click.option("--rank1", is_flag=True, help="Also rank-1 identification accuracy (nearest other image).")
@click.option("--log-fpr", is_flag=True, help="Logarithmic false-positive-rate axis in roc.png.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing results folder (only one that score or merge wrote)."
)
@click.option("--label", default=None, help="Name of this result in legends and tables.")
@click.option(
    "--variant",
    type=click.Choice(["pretrained", "finetuned"]),
    default=None,
    help="For report's table (default: guessed from the store's weights).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample that sets the bin range.")
@click.option("--no-progress", "progress", flag_value=False, default=True, help="No progress bar.")
@click.option(
    "--no-score-norm",
    "score_norm",
    flag_value=False,
    default=True,
    help="Ignore the store's score offsets (cohort normalisation, /score_offsets): score the plain cosine.",
)
@click.option(
    "--rows",
    default=None,
    metavar="A:B",
    help="Only the pairs i < j with A <= i < B, rows counted in label order (the order of stores `embed` "
    "writes), read in blocks (out of core; an unsorted store is first copied sorted into TMPDIR); add the parts "
    "with `merge`.",
)
@click.option(
    "--calibrate-on",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Fit a logistic calibration (score -> log-likelihood ratio) on the histograms of this results folder "
    "(same network and metric, another set) and apply it here: Cllr, minCllr, calibration.png.",
)
@click.option(
    "--threshold-from",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Take the threshold that gives FAR --at-far on this results folder (same network and metric, another "
    "set) and report the FAR and FRR it gives here, with 95%% upper bounds and whether the claim holds.",
)
@click.option("--at-far", type=float, default=None, metavar="F", help="The FAR of --threshold-from's threshold.")
def score(store: Path, mode: str | None, rows: str | None, **options) -> None:
    """Score pairs of an embedding store: ROC, AUC, EER, TAR@FAR, accuracy into a results folder."""
    from pipeline.scoring.config import ScoreConfig, parse_rows

    check_inputs(store, mode, options["scores"])
    try:
        span = None if rows is None else parse_rows(rows)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rows") from None
    cfg = ScoreConfig(store=store, all_pairs=mode == "all-pairs", rows=span, **options)
    if cfg.scores is not None:  # without torch
        from pipeline.scoring.from_scores import score_file

        echo_scored(score_file(cfg), options["out"])
        return
    if cfg.rows is not None or (cfg.all_pairs and cfg.scores is None and _larger_than_memory(store, options)):
        _score_rows(cfg)
        return
    from pipeline.scoring.stage import score as run_score

    m = run_score(cfg)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    echo_scored(m, options["out"])


def _larger_than_memory(store: Path, options: dict) -> bool:
    """Out of core when the store is too large for memory, unless --exact, --rank1, FAISS or CUDA need it whole."""
    from pipeline.scoring.rows import larger_than_memory

    whole = options["exact"] or options["rank1"] or options["backend"] != "torch" or options["device"] == "cuda"
    return not whole and larger_than_memory(store)


def _score_rows(cfg) -> None:
    """Out of core: the span `cfg.rows` (None: every row) into a part folder (the full results when complete)."""
    from pipeline.scoring.all_pairs import score_rows

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError("--rows splits the work by hand (job arrays): run it without torchrun")
    for flag, given in (("--calibrate-on", cfg.calibrate_on), ("--threshold-from", cfg.threshold_from)):
        if given is not None:
            raise click.UsageError(f"{flag}: this store is scored out of core, which does not take it yet")
    info = score_rows(cfg)
    done = f"{info['n_pairs']} pairs ({info['n_positive']} same), {info['seconds']:.3f} s -> {cfg.out}"
    metrics = Path(cfg.out) / "metrics.json" if cfg.out else None
    if metrics is not None and metrics.is_file():
        import json

        m = json.loads(metrics.read_text())
        click.echo(auc_line(m, f"over {done}"))
        echo_not_measurable(m)
    else:
        click.echo(f"rows {info['rows'][0]}:{info['rows'][1]}: {done}")


@main.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The merged results folder.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing results folder (only one that score or merge wrote)."
)
@click.option("--log-fpr", is_flag=True, help="Logarithmic false-positive-rate axis in roc.png.")
def merge(**options) -> None:
    """Add `score --all-pairs --rows A:B` parts (job arrays) into one result, or join `identify --rows A:B`
    parts; the full results folder when they cover every row."""
    import json

    from pipeline.identify.merge import is_identify_part

    if is_identify_part(options["parts"][0]):
        merge_identify_parts(options)
        return
    from pipeline.scoring.merge import MergeConfig
    from pipeline.scoring.merge import merge as run_merge

    info = run_merge(MergeConfig(**options))
    out = options["out"]
    if info["complete"]:
        m = json.loads((out / "metrics.json").read_text())
        click.echo(
            auc_line(m, f"over {m['n_pairs']} pairs ({m['n_positive']} same) from {info['parts']} parts -> {out}")
        )
        echo_not_measurable(m)
    else:
        click.echo(f"rows {info['ranges']} of {info['store_n']}: {info['n_pairs']} pairs (partial) -> {out}")


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default="report", show_default=True, help="Report folder.")
@click.option("--log-fpr", is_flag=True, help="Logarithmic false-positive-rate axis.")
@click.option("--html", is_flag=True, help="Also OUT/report.html: one self-contained page with every figure.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier report in OUT (ours only).")
def report(folders: tuple[Path, ...], out: Path, log_fpr: bool, html: bool, overwrite: bool) -> None:
    """The study's table (table.md), one ROC figure (roc.png) and the training curves (training.png, when found)
    from results folders or run folders (a run folder stands for its four results); with identify folders, their
    table and one CMC (cmc.png) and IET (iet.png) figure."""
    from pipeline.report.tables import report as run_report

    click.echo(run_report(list(folders), out, log_fpr=log_fpr, overwrite=overwrite, html=html), nl=False)


@main.group(cls=BenchmarkGroup)
def bench() -> None:
    """Benchmarks that print a table of ratios measured in the same run (also `python -m benchmarks.MODULE`)."""


@main.command(cls=ConfigCommand, configs=_finetune_config, notes=recipe_notes)
@network_source_options("Starting weights: imagenet, none, or PATH to a state_dict / checkpoint.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file (.pt).")
@finetune_options
@device_option
@workers_option
@click.option("--resume", is_flag=True, help="Continue the checkpoint at OUT (same options).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start over although OUT exists (replaces OUT, OUT's .log and .best.pt: ours only).",
)
@click.option(
    "--no-cache",
    "cache_features",
    flag_value=False,
    default=True,
    help="Recompute the frozen features every step in phase 1 (for measuring the cache).",
)
@config_file_option
@click.pass_context
def finetune(ctx: click.Context, config_file: Path | None, **options) -> None:
    """Fine-tune an ImageNet CNN for face verification (checkpoint after every epoch; Ctrl-C saves)."""
    from pipeline.finetune import FinetuneConfig, TrainingInterrupted
    from pipeline.finetune import finetune as run_finetune

    try:
        path = run_finetune(FinetuneConfig(**stage_kwargs(ctx, options, config_file, FinetuneConfig)))
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    click.echo(str(path))


@main.command(cls=ConfigCommand, configs=_run_config, notes=recipe_notes, hidden_fields=("finetune", "resume"))
@network_source_options("Pretrained weights: imagenet, none, or PATH to a state_dict.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for stores, results, checkpoint, summary.json, table.md and ROC figures.",
)
@finetune_options
@device_option
@workers_option
@click.option(
    "--embed-batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Images per forward pass when embedding (larger batches held far more memory for the same embeddings: "
    "docs/finetuning.md#memory).",
)
@click.option("--limit", type=int, default=None, help="Quick runs: only the first N test pairs / test images.")
@tta_resizes_option("Applies to the fine-tuned network's stores [the recipe's: best 240,272; study none].", None)
@click.option(
    "--overwrite", is_flag=True, help="Redo every step instead of reusing finished ones (replaces only what run wrote)."
)
@config_file_option
@click.pass_context
def run(ctx: click.Context, config_file: Path | None, **options) -> None:
    """The whole study: pretrained and fine-tuned, LFWPairs and LFWPeople test, table and ROC figures."""
    from pipeline.finetune import FinetuneConfig, TrainingInterrupted
    from pipeline.run import RunConfig
    from pipeline.run import run as run_study

    cfg = RunConfig(**stage_kwargs(ctx, options, config_file, RunConfig, nested=("finetune", FinetuneConfig)))
    try:
        summary = run_study(cfg)
    except TrainingInterrupted as e:
        click.echo(f"{e} (rerun `run` with the same options: finished steps are reused)", err=True)
        sys.exit(130)
    click.echo((Path(cfg.out) / "table.md").read_text(), nl=False)
    click.echo(
        f"LFWPairs test AUC {summary['pairs']['pretrained']:.4f} -> {summary['pairs']['finetuned']:.4f}, "
        f"LFWPeople test AUC {summary['people']['pretrained']:.4f} -> {summary['people']['finetuned']:.4f}"
    )


main.add_command(identify)
main.add_command(compare)

if __name__ == "__main__":
    main()
