"""`report` of several results folders (or `run` folders, which stand for their four results): one ROC figure,
the study's table, the training curves when a result comes from a fine-tuning that drew them, and with `html`
one self-contained page (`pipeline.report.html`); results folders of `identify` add the identification table and
figures (`pipeline.report.identification`). Figures are drawn by `pipeline.report.figures`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.report import figures, identification, training
from pipeline.report.compare import comparisons_markdown, report_comparison_results
from pipeline.report.html import GENERATOR, decision_cells, write_page
from pipeline.report.identification import Identifications
from pipeline.report.read import (
    VARIANTS,
    is_identification,
    protocol_name,
    read_identification,
    read_result,
    study_cells,
    title_of,
)

log = logging.getLogger(__name__)

REPORT_FILES = ("table.md", "roc.png")
"""What every report with verification results writes (one of identification results only: table.md, cmc.png,
iet.png)."""
TABLE_STARTS = (b"| model |", b"| identification |")
"""How table.md starts: with the study's table, or, with identification results only, the identification table."""
TRAINING_FILE = "training.png"
"""Written when the results come from one fine-tuning whose training figure exists."""
HTML_FILE = "report.html"
"""Written with `html`."""
RUN_RESULTS = tuple(f"{v}-{p}" for p in ("pairs", "people") for v in VARIANTS)
"""The results folders of a `run` folder (OUT/results/NAME), in table order."""


def study_table(results: list[dict]) -> str:
    """Markdown in the study's layout: one row per model, per protocol pretrained / fine-tuned / improvement."""
    return markdown_table(*study_cells(results))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table ("|" in a cell escaped), ending with a newline."""
    lines = [header, *rows]
    out = ["| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |" for cells in lines]
    out.insert(1, "|" + " --- |" * len(header))
    return "\n".join(out) + "\n"


def decisions_markdown(folders: list[Path], results: list[dict]) -> str:
    """table.md's "Thresholds and calibration" section (`pipeline.report.html.decision_cells`: thresholds carried
    from other pairs, Cllr and minCllr); "" when no result has either."""
    header, rows = decision_cells(folders, results)
    if not rows:
        return ""
    note = ("FAR and FRR here with one-sided 95% upper bounds; the claim holds when the FAR's upper bound is at most "
            "the target FAR. minCllr: the least any calibration of these scores reaches.")  # fmt: skip
    return "\n## Thresholds and calibration\n\n" + markdown_table(header, rows) + "\n" + note + "\n"


def recognise_report_file(path: Path) -> str | None:
    """None when `path` is a table.md, figure or report.html that this tool wrote; else what it is."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix == ".md":
        return None if head.startswith(TABLE_STARTS) else "it is not a table written by report"
    if path.suffix == ".html":
        return None if GENERATOR.encode() in head else "it is not a page written by report"
    if path.name == TRAINING_FILE:
        return figures.recognise_figure(path, "training")
    if path.name in identification.FIGURES:
        return figures.recognise_figure(path, identification.FIGURES[path.name])
    return figures.recognise_figure(path, legacy=True)  # roc.png of versions that did not mark their figures


# ---------------------------------------------------------------------------------------------------- inputs


def run_folder_results(folder: Path) -> list[Path] | None:
    """The results folders of a `run` folder (one holding summary.json and results/), None for other folders."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(summary, dict) and {"pairs", "people", "recipe"} <= set(summary)):
        return None
    found = [
        folder / "results" / name for name in RUN_RESULTS if (folder / "results" / name / "metrics.json").is_file()
    ]
    if not found:
        raise PipelineError(f"{folder} is a run folder without results (no results/*/metrics.json): rerun `run`")
    return found


def expand_folders(folders: list[Path]) -> tuple[list[Path], list[Path]]:
    """(results folders, run folders): each run folder stands for its results folders."""
    results, runs = [], []
    for folder in map(Path, folders):
        inside = run_folder_results(folder) if not (folder / "metrics.json").is_file() else None
        if inside is None:
            results.append(folder)
        else:
            runs.append(folder)
            results += inside
    return results, runs


def training_figures(runs: list[Path], results: list[dict]) -> list[tuple[str, bytes]]:
    """(source, PNG) of the training figures behind the results, each once: per run folder its training.png,
    else its checkpoint's, else one drawn now from its summary.json's history (runs of older versions); per
    fine-tuned result the one of the run folder its store lies in, else the one beside its checkpoint."""
    choices = [[run / TRAINING_FILE, training.training_figure_path(run / "finetune" / "model.pt")] for run in runs]
    for m in results:
        weights = str(m.get("weights") or "")
        if weights in ("", "imagenet", "none"):
            continue
        store = Path(str(m.get("store") or ""))
        alternatives = [store.parent.parent / TRAINING_FILE] if store.parent.name == "embeddings" else []
        choices.append([*alternatives, training.training_figure_path(Path(weights))])
    found: dict[Path, tuple[str, bytes]] = {}
    for k, alternatives in enumerate(choices):
        path = next((p for p in alternatives if figures.recognise_figure(p, "training") is None), None)
        if path is not None:
            found.setdefault(path.resolve(), (str(path), path.read_bytes()))
        elif k < len(runs) and (drawn := draw_run_history(runs[k])) is not None:
            found.setdefault((runs[k] / TRAINING_FILE).resolve(), drawn)
    return list(found.values())


def draw_run_history(run: Path) -> tuple[str, bytes] | None:
    """The training figure of a run folder drawn from its summary.json (fine-tuning history), if it has one."""
    try:
        ft = json.loads((Path(run) / "summary.json").read_text())["finetune"]
        history, config = list(ft["history"]), dict(ft["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    buf = io.BytesIO()
    training.draw_training(history, buf, training.training_title(config), ft.get("best_epoch"))
    return f"{run / 'summary.json'} (history drawn by report)", buf.getvalue()


# ---------------------------------------------------------------------------------------------------- report


def read_verification(folders: list[Path]) -> tuple[list[dict], list[figures.Curve]]:
    """The metrics and ROC curves (legend: title and AUC) of verification results folders."""
    results, curves = [], []
    for folder in folders:
        metrics, fpr, tpr = read_result(folder)
        results.append(metrics)
        curves.append((fpr, tpr, f"{title_of(metrics)}: AUC = {metrics['auc']:.4f}"))
    return results, curves


def report_table(
    folders: list[Path], results: list[dict], ident: Identifications, compared: list[dict] | None = None
) -> str:
    """table.md: the study's table of the verification results (`folders`, `results`), then, after an empty line,
    the identification table (either alone when the report has results of one kind only); then the thresholds
    carried and calibrations (`decisions_markdown`) and the comparisons (`compared`), where there are any."""
    tables = [study_table(results)] if results or not ident.results else []
    if ident.results:
        tables.append(identification.markdown_table(ident.folders, ident.results))
    return "\n".join(tables) + decisions_markdown(folders, results) + comparisons_markdown(compared or [])


def output_names(verified: bool, identified: bool, n_training: int, training: bool, html: bool) -> list[str]:
    """The files a report writes, table.md first: roc.png with verification results (`verified`), cmc.png and
    iet.png with identification results (`identified`), training.png with `training` when one training figure was
    found, report.html with `html`."""
    names = ["table.md", *(["roc.png"] if verified else []), *(identification.FIGURES if identified else [])]
    if training and n_training == 1:
        names.append(TRAINING_FILE)
    elif training and n_training > 1:
        log.info("%d training figures found: report.html (--html) shows them all", n_training)
    return names + ([HTML_FILE] if html else [])


def write_identification_figures(out: Path, ident: Identifications) -> None:
    """out/cmc.png and out/iet.png: the CMC and IET of all identification results, kept in `ident.figures` for
    the page."""
    for name, kind in identification.FIGURES.items():
        outputs.replace_file(lambda p, kind=kind: identification.draw_all(kind, ident.results, p), out / name)
        caption = f"{identification.CAPTIONS[kind]} of all identification results"
        ident.figures.append((caption, (out / name).read_bytes()))


def report(
    folders: list[Path],
    out: Path,
    log_fpr: bool = False,
    overwrite: bool = False,
    html: bool = False,
    training: bool = True,
) -> str:
    """One ROC figure (out/roc.png) and the study's table (out/table.md) from results or run folders; with
    `training`, the training figure (out/training.png) when the results come from one fine-tuning that drew
    it; with `html`, out/report.html (tables, every result's figures and provenance, training curves, all in
    one file). An existing output is replaced only with `overwrite`, and only when this tool wrote it.

    Results folders of `identify` (metrics.json with mode "identify") may come among them: table.md then holds
    the identification table below the study's (one row per identification result), out/cmc.png and out/iet.png
    hold the CMC and the identification error tradeoff of all identification results, and report.html has their
    table, figures, distractor curves and descriptions. A report of identification results only has no ROC:
    table.md is the identification table alone, and cmc.png and iet.png are its figures (no roc.png).

    Then the thresholds carried and calibrations (`score --threshold-from`, `--calibrate-on`) and the paired
    comparisons of results of the same pairs (`pipeline.report.compare.report_comparison_results`, each against the
    first pretrained one: differences, intervals, p-values), in table.md and report.html."""
    if not folders:
        raise PipelineError("report needs at least one results folder")
    out = Path(out)
    result_dirs, runs = expand_folders(folders)
    outputs.check_folder_out(out, inputs=list(folders) + result_dirs, holds_inputs=False)
    ident_dirs = [d for d in result_dirs if is_identification(d)]
    verification = [d for d in result_dirs if d not in ident_dirs]
    results, curves = read_verification(verification)
    ident = Identifications(ident_dirs, [read_identification(d) for d in ident_dirs])
    found = training_figures(runs, results + ident.results) if training or html else []
    names = output_names(bool(results), bool(ident.results), len(found), training, html)

    def check() -> None:
        for name in names:
            outputs.check_replaceable(out / name, overwrite, recognise_report_file, "report file")

    check()
    out.mkdir(parents=True, exist_ok=True)
    compared = report_comparison_results(verification, results)
    table = report_table(verification, results, ident, compared)
    title = "ROC of " + ", ".join(sorted({protocol_name(m) for m in results}))
    with outputs.output_lock(out / "table.md"):
        check()  # again under the lock: another run may have written them since
        for name in names[1:]:
            outputs.recover_leftovers(out / name, ())  # temporaries of killed runs
        outputs.replace_file(lambda p: p.write_text(table), out / "table.md")
        if results:
            outputs.replace_file(lambda p: figures.draw_roc(curves, p, title, log_fpr), out / "roc.png")
        if ident.results:
            write_identification_figures(out, ident)
        if TRAINING_FILE in names:
            outputs.replace_file(lambda p: p.write_bytes(found[0][1]), out / TRAINING_FILE)
        if html:
            roc_png = (out / "roc.png").read_bytes() if results else None
            args = (verification, results, roc_png, found, ident, compared)
            outputs.replace_file(lambda p: write_page(p, *args), out / HTML_FILE)
    log.info("wrote %s", ", ".join(str(out / n) for n in names))
    return table
