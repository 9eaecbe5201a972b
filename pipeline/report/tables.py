"""`report` of several results folders (or `run` folders, which stand for their four results): one ROC figure,
the study's table, the training curves when a result comes from a fine-tuning that drew them, and with `html`
one self-contained page (`pipeline.report.html`). Figures are drawn by `pipeline.report.figures`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.report import figures
from pipeline.report.html import GENERATOR, write_page
from pipeline.report.read import VARIANTS, protocol_name, read_result, study_cells, title_of

log = logging.getLogger(__name__)

REPORT_FILES = ("table.md", "roc.png")
"""What every report writes."""
TRAINING_FILE = "training.png"
"""Written when the results come from one fine-tuning whose training figure exists."""
HTML_FILE = "report.html"
"""Written with `html`."""
RUN_RESULTS = tuple(f"{v}-{p}" for p in ("pairs", "people") for v in VARIANTS)
"""The results folders of a `run` folder (OUT/results/NAME), in table order."""


def study_table(results: list[dict]) -> str:
    """Markdown in the study's layout: one row per model, per protocol pretrained / fine-tuned / improvement."""
    header, body = study_cells(results)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(vals) + " |" for vals in body]
    return "\n".join(lines) + "\n"


def recognise_report_file(path: Path) -> str | None:
    """None when `path` is a table.md, figure or report.html that this tool wrote; else what it is."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix == ".md":
        return None if head.startswith(b"| model |") else "it is not a table written by report"
    if path.suffix == ".html":
        return None if GENERATOR.encode() in head else "it is not a page written by report"
    if path.name == TRAINING_FILE:
        return figures.recognise_figure(path, "training")
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
    choices = [[run / TRAINING_FILE, figures.training_figure_path(run / "finetune" / "model.pt")] for run in runs]
    for m in results:
        weights = str(m.get("weights") or "")
        if weights in ("", "imagenet", "none"):
            continue
        store = Path(str(m.get("store") or ""))
        alternatives = [store.parent.parent / TRAINING_FILE] if store.parent.name == "embeddings" else []
        choices.append([*alternatives, figures.training_figure_path(Path(weights))])
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
    figures.draw_training(history, buf, figures.training_title(config), ft.get("best_epoch"))
    return f"{run / 'summary.json'} (history drawn by report)", buf.getvalue()


# ---------------------------------------------------------------------------------------------------- report


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
    one file). An existing output is replaced only with `overwrite`, and only when this tool wrote it."""
    if not folders:
        raise PipelineError("report needs at least one results folder")
    out = Path(out)
    result_dirs, runs = expand_folders(folders)
    outputs.check_folder_out(out, inputs=list(folders) + result_dirs, holds_inputs=False)
    results, curves = [], []
    for folder in result_dirs:
        metrics, fpr, tpr = read_result(folder)
        results.append(metrics)
        curves.append((fpr, tpr, f"{title_of(metrics)}: AUC = {metrics['auc']:.4f}"))
    found = training_figures(runs, results) if training or html else []
    names = list(REPORT_FILES)
    if training and len(found) == 1:
        names.append(TRAINING_FILE)
    elif training and len(found) > 1:
        log.info("%d training figures found: report.html (--html) shows them all", len(found))
    if html:
        names.append(HTML_FILE)

    def check() -> None:
        for name in names:
            outputs.check_replaceable(out / name, overwrite, recognise_report_file, "report file")

    check()
    out.mkdir(parents=True, exist_ok=True)
    table = study_table(results)
    title = "ROC of " + ", ".join(sorted({protocol_name(m) for m in results}))
    with outputs.output_lock(out / "table.md"):
        check()  # again under the lock: another run may have written them since
        for name in names[1:]:
            outputs.recover_leftovers(out / name, ())  # temporaries of killed runs
        outputs.replace_file(lambda p: p.write_text(table), out / "table.md")
        outputs.replace_file(lambda p: figures.draw_roc(curves, p, title, log_fpr), out / "roc.png")
        if TRAINING_FILE in names:
            outputs.replace_file(lambda p: p.write_bytes(found[0][1]), out / TRAINING_FILE)
        if html:
            roc_png = (out / "roc.png").read_bytes()
            outputs.replace_file(lambda p: write_page(p, result_dirs, results, roc_png, found), out / HTML_FILE)
    log.info("wrote %s", ", ".join(str(out / n) for n in names))
    return table
