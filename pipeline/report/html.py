"""`report --html`: one self-contained HTML page (no scripts, no external files: CSS inline, figures as base64 PNG
data URIs) with the study's table, the operating points (with 95% intervals where metrics.json has them), the
thresholds carried from other pairs and the calibrations (`score --threshold-from`, `--calibrate-on`), the paired
comparisons of results of the same pairs (`pipeline.report.compare`), the ROC of all results, the training curves, and each result's figures and provenance; for results of `identify`,
the identification table and figures (`pipeline.report.identification`)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.metrics.roc import HistogramROC
from pipeline.report import figures, identification
from pipeline.report.compare import MODES, comparison_cells, delong_text
from pipeline.report.identification import Identifications
from pipeline.report.markup import data_uri, esc, figure, interval, render, table, with_ci
from pipeline.report.read import protocol_name, read_result, study_cells, title_of
from pipeline.report.results import CALIBRATION_FILE, FIGURE_FILES

log = logging.getLogger(__name__)

GENERATOR = '<meta name="generator" content="lfw-verify report">'
"""In the head of every page `report` writes (how `--overwrite` recognises one)."""
FIGURE_CAPTIONS = {"roc.png": "ROC", "det.png": "DET (FNMR over FMR)", "scores.png": "score distributions"}
PROVENANCE_KEYS = (
    ("model", "model"),
    ("layer", "layer"),
    ("weights", "weights"),
    ("weights_sha256", "weights sha256"),
    ("image_set", "image set"),
    ("protocol", "protocol"),
    ("split", "split"),
    ("limit", "limit"),
    ("created", "store created"),
    ("device", "embedded on"),
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.45em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; }
.ci { display: block; color: #666; font-size: 0.85em; }
code, pre, .wrap td { overflow-wrap: anywhere; } pre { white-space: pre-wrap; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
figure img { max-width: 560px; width: 100%; border: 1px solid #eee; } figcaption { font-size: 0.85em; color: #555; }
code { font-size: 0.9em; } .note { color: #666; font-size: 0.9em; }
"""
"""Fits a 1,280-pixel window (tests/test_report.py checks it in chromium): headers wrap, intervals take a second
line in their cell and may break at the comma, paths and provenance values break anywhere."""


# ---------------------------------------------------------------------------------------------------- figures


def result_figures(folder: Path, metrics: dict) -> list[tuple[str, bytes]]:
    """(caption, PNG) of each figure of a results folder: the folder's own file, or, for a folder written before
    that figure existed, one drawn now from its roc.csv and histogram.npz."""
    out, acc = [], None
    for name in FIGURE_FILES:
        caption = FIGURE_CAPTIONS[name]
        path = Path(folder) / name
        if figures.recognise_figure(path, legacy=True) is None:
            out.append((caption, path.read_bytes()))
            continue
        try:
            if name == "det.png":
                _, fpr, tpr = read_result(folder)
                png = render(figures.draw_det, [(fpr, tpr, f"EER = {metrics['eer']:.4f}")], title_of(metrics))
            elif name == "scores.png":
                acc = acc or HistogramROC.load(Path(folder) / "histogram.npz")
                thresholds = figures.operating_thresholds(metrics, acc.compute()["roc"])
                png = render(figures.draw_scores, acc, title_of(metrics), thresholds, metrics)
            else:
                continue
        except (PipelineError, OSError, KeyError, ValueError) as e:
            log.warning("no %s for %s: %s", name, folder, e)
            continue
        out.append((caption + " (drawn by report)", png))
    calibration = Path(folder) / CALIBRATION_FILE  # score --calibrate-on only
    if figures.recognise_figure(calibration, "calibration") is None:
        out.append(("reliability of the calibration", calibration.read_bytes()))
    return out


# ---------------------------------------------------------------------------------------------------- tables


def far_levels(results: list[dict]) -> list[str]:
    levels = {k for m in results for k in (m.get("tar_at_far") or {})}
    return sorted(levels, key=float)


ACCURACIES = (
    ("best_accuracy", "best accuracy"),
    ("best_balanced_accuracy", "best balanced accuracy"),
    ("best_unbalanced_accuracy", "best accuracy (pairs' mix)"),
    ("accuracy_10fold_mean", "10-fold accuracy"),
)
"""Accuracy keys of metrics.json shown when some result has them."""


NOT_MEASURABLE_NOTE = (
    " Not measurable: with N different-person pairs a FAR f is observed only when f &times; N &ge; 1 (one false "
    "accept); below that the pairs show only the rate at FAR 0, so no TAR is given (grey: the smallest FAR that "
    "is, 1/N)."
)
"""Added to the operating points' note when some result has levels it cannot measure."""


def tar_cell(m: dict, level: str) -> str:
    """TAR at FAR `level` with its interval; "not measurable" (and the smallest FAR that is) where metrics.json holds
    the level as null, "-" where it lacks it."""
    tar, tar_ci = m.get("tar_at_far") or {}, m.get("tar_at_far_ci95")
    if level in tar and tar[level] is None:
        smallest = m.get("smallest_measurable_far")
        below = f'<span class="ci">FAR &ge; {float(smallest):.3g}</span>' if smallest is not None else ""
        return f"not measurable{below}"
    return with_ci(tar.get(level), tar_ci.get(level) if isinstance(tar_ci, dict) else None)


def operating_points(folders: list[Path], results: list[dict]) -> str:
    """One row per result: pairs, AUC, EER, TAR at each FAR, best accuracy (95% intervals where recorded)."""
    levels = far_levels(results)
    accuracies = [(k, label) for k, label in ACCURACIES if any(m.get(k) is not None for m in results)]
    shown = {"auc_ci95", "eer_ci95", "tar_at_far_ci95", *(f"{k}_ci95" for k, _ in accuracies)}
    extra = any(k.endswith("_ci95") and k not in shown for m in results for k in m)
    header = ["result", "pairs (same)", "AUC", "EER", *[f"TAR at FAR {f}" for f in levels]]
    header += [label for _, label in accuracies] + (["other 95% intervals"] if extra else [])
    rows = []
    for folder, m in zip(folders, results, strict=True):
        row = [
            f"{esc(m.get('label') or m.get('model') or folder.name)}<br><code>{esc(folder)}</code>",
            f"{m.get('n_pairs', 0):,} ({m.get('n_positive', 0):,})",
            with_ci(m.get("auc"), m.get("auc_ci95")),
            with_ci(m.get("eer"), m.get("eer_ci95")),
            *[tar_cell(m, f) for f in levels],
            *[with_ci(m.get(k), m.get(f"{k}_ci95")) for k, _ in accuracies],
        ]
        if extra:
            others = [
                f"{esc(k[:-5])} [{b[0]:.4f}, {b[1]:.4f}]"
                for k, v in m.items()
                if k.endswith("_ci95") and k not in shown and (b := interval(v)) is not None
            ]
            row.append("<br>".join(others) or "-")
        rows.append(row)
    return table(header, rows, raw=True)


def provenance(folder: Path, m: dict) -> str:
    """Where a result comes from: folder, store, model and weights, image set, commit and dates if recorded."""
    attrs = m.get("provenance") or {}
    rows = [["results folder", str(folder)], ["store", str(m.get("store", "not recorded"))]]
    rows += [[label, str(attrs.get(k, m.get(k)))] for k, label in PROVENANCE_KEYS if attrs.get(k, m.get(k)) is not None]
    rows.append(["variant", str(m.get("variant", "-"))])
    rows.append(
        ["scored", f"metric {m.get('metric')}, {m.get('bins')} bins, {m.get('backend', '-')} on {m.get('device', '-')}"]
    )
    commit = next((src[k] for src in (m, attrs) for k in ("commit", "git_commit", "git_rev") if src.get(k)), None)
    rows.append(["commit", str(commit) if commit else "not recorded"])
    when = next((src[k] for src in (m, attrs) for k in ("scored", "date") if src.get(k)), None)
    if when is None and (Path(folder) / "metrics.json").is_file():
        stamp = dt.datetime.fromtimestamp((Path(folder) / "metrics.json").stat().st_mtime, dt.timezone.utc)
        when = f"{stamp.isoformat(timespec='seconds')} (time of metrics.json)"
    rows.append(["results written", str(when or "not recorded")])
    versions = ", ".join(f"{k[:-8]} {v}" for k, v in sorted(attrs.items()) if k.endswith("_version"))
    if versions:
        rows.append(["libraries (embedding)", versions])
    everything = json.dumps(attrs, indent=1, sort_keys=True, default=str)
    details = f"<details><summary>all store attributes</summary><pre>{esc(everything)}</pre></details>"
    return table(["", ""], rows, css_class="wrap") + details


# ---------------------------------------------------------------------------------------------------- decisions


def rate_text(c: dict, name: str) -> str:
    """A carried threshold's rate ("far", "frr") with its one-sided 95% upper bound; bounds where only the bins
    bound the rate."""
    rate = c.get(name)
    bounds = c.get(f"{name}_bounds") or [math.nan, math.nan]
    text = f"{rate:.4g}" if rate is not None else f"in [{bounds[0]:.4g}, {bounds[1]:.4g}]"
    return f"{text} (\u2264 {c[f'{name}_upper95']:.4g})"


def carried_cells(c: dict | None) -> list[str]:
    """Threshold (and its score), source, target FAR, FAR and FRR here with upper bounds, the claim."""
    if not c:
        return ["-"] * 6
    claim = "holds" if c["claim_holds"] else "does not hold"
    threshold = f"{c['threshold']:.6g}" + (f" ({c['score']})" if c.get("score") else "")
    return [threshold, str(c["source"]), f"{c['target_far']:g}", rate_text(c, "far"), rate_text(c, "frr"), claim]


def calibration_cells(m: dict) -> list[str]:
    """Cllr, minCllr and the calibration's source with its map."""
    cal = m.get("calibration")
    if not cal:
        return ["-"] * 3
    source = f"{cal['source']} (llr = {cal['slope']:.4g} s {cal['offset']:+.4g})"
    return [f"{m['cllr']:.4f}", f"{m['min_cllr']:.4f}", source]


def decision_cells(folders: list[Path], results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows), plain text, of the thresholds carried from other pairs (`score --threshold-from`) and the
    calibrations (`score --calibrate-on`): one row per result that has either, no rows when none has. The cells of
    the "Thresholds and calibration" table of report.html and of table.md."""
    carried = any(m.get("carried_threshold") for m in results)
    calibrated = any(m.get("calibration") for m in results)
    header = ["result"]
    if carried:
        header += ["threshold", "carried from", "target FAR", "FAR here (95% upper)", "FRR here (95% upper)", "claim"]
    if calibrated:
        header += ["Cllr", "minCllr", "calibrated on"]
    rows = []
    for folder, m in zip(folders, results, strict=True):
        if not (m.get("carried_threshold") or m.get("calibration")):
            continue
        row = [f"{title_of(m)} ({folder})"]
        row += carried_cells(m.get("carried_threshold")) if carried else []
        row += calibration_cells(m) if calibrated else []
        rows.append(row)
    return header, rows


DECISIONS_NOTE = (
    "Threshold: carried from another set of pairs (<code>score --threshold-from DIR --at-far F</code>), the rates "
    "it gives here with one-sided 95% upper bounds; the claim holds when the FAR's upper bound is at most the "
    "target. Cllr: the cost of the scores calibrated on another set (<code>score --calibrate-on DIR</code>); "
    "minCllr: the least any calibration of these scores reaches."
)


def decisions(folders: list[Path], results: list[dict]) -> list[str]:
    """The "Thresholds and calibration" section; [] when no result has a carried threshold or a calibration."""
    header, rows = decision_cells(folders, results)
    if not rows:
        return []
    return [
        "<h2>Thresholds and calibration</h2>",
        f'<p class="note">{DECISIONS_NOTE}</p>',
        table(header, rows, css_class="wrap"),
    ]


def comparisons(compared: list[dict]) -> list[str]:
    """The "Comparisons" section: per comparison of `pipeline.report.compare.report_comparison_results` (the
    numbers of table.md's), B - A of AUC, EER and TAR at each FAR with the paired 95% interval and p-value, and the
    method; [] without comparisons."""
    if not compared:
        return []
    parts = [
        "<h2>Comparisons</h2>",
        '<p class="note">Results scored on the same pairs, each (B) against the first pretrained one (A): B - A with '
        "a paired 95% interval and p-value (as <code>cli.py compare</code>).</p>",
    ]
    for c in compared:
        parts.append(f"<h3>{esc(c['b_label'])} against {esc(c['a_label'])}</h3>")
        parts.append(
            f'<p class="note">A: <code>{esc(c["a"])}</code><br>B: <code>{esc(c["b"])}</code><br>'
            f"{c['n_pairs']:,} pairs ({c['n_positive']:,} same): {esc(MODES.get(c['mode'], c['mode']))}</p>"
        )
        parts.append(table(["metric", "A", "B", "B - A", "95% interval", "p"], comparison_cells(c)))
        notes = [t for t in (delong_text(c), f"Method: {c['method']}.") if t]
        parts += [f'<p class="note">{esc(t)}</p>' for t in notes]
    return parts


# ---------------------------------------------------------------------------------------------------- page


def verification_summary(
    folders: list[Path], results: list[dict], roc_png: bytes, compared: list[dict] | None = None
) -> list[str]:
    """The study's table, the operating points, the carried thresholds and calibrations (where results have them),
    the comparisons (`compared`: `pipeline.report.compare.report_comparison_results`) and the ROC of all
    verification results."""
    header, body = study_cells(results)
    return [
        "<h2>AUC in the study's layout</h2>",
        table(header, body),
        "<h2>Operating points</h2>",
        '<p class="note">TAR: same-person pairs accepted at a false accept rate (FAR); EER: equal error rate; '
        "best accuracy over all thresholds. Grey: 95% intervals, where metrics.json records them."
        + (NOT_MEASURABLE_NOTE if any(m.get("not_measurable") for m in results) else "")
        + "</p>",
        operating_points(folders, results),
        *decisions(folders, results),
        *comparisons(compared or []),
        "<h2>ROC of all results</h2>",
        f'<div class="figs">{figure(roc_png, "ROC of " + ", ".join(sorted({protocol_name(m) for m in results})))}</div>',
    ]


def verification_sections(folders: list[Path], results: list[dict]) -> list[str]:
    """One section per verification result: its figures and provenance."""
    parts = ["<h2>Results</h2>"]
    for k, (folder, m) in enumerate(zip(folders, results, strict=True)):
        parts.append(f'<section id="result-{k}"><h3>{esc(title_of(m))}: AUC {float(m["auc"]):.4f}</h3>')
        figs = result_figures(folder, m)
        parts.append('<div class="figs">' + "".join(figure(png, cap) for cap, png in figs) + "</div>")
        parts.append(provenance(folder, m) + "</section>")
    return parts


def page(
    folders: list[Path],
    results: list[dict],
    roc_png: bytes | None,
    training: list[tuple[str, bytes]],
    identified: Identifications | None = None,
    compared: list[dict] | None = None,
) -> str:
    """The HTML text of the report: the verification results' tables, comparisons (`compared`) and ROC (`roc_png`),
    the identification results' table and figures (`identified`), the training curves, then each result's section.
    A report without verification results (`results` empty, `roc_png` None) has no verification parts, one without identification
    results (`identified` None or empty) no identification parts."""
    ident = identified if identified is not None and identified.results else None
    kinds = ["verification"] * bool(results) + ["identification"] * (ident is not None)
    name = f"Face-{' and '.join(kinds or ['verification'])} report"
    counted = f"{len(results)} results"
    if ident is not None:
        counted = " and ".join(
            [f"{len(results)} verification"] * bool(results) + [f"{len(ident.results)} identification"]
        )
        counted += " results"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        GENERATOR,
        f"<title>{name}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{name}</h1>",
        f'<p class="note">{counted}, written {esc(now)} by <code>cli.py report --html</code>.</p>',
    ]
    if results:
        parts += verification_summary(folders, results, roc_png, compared)
    if ident is not None:
        parts += identification.summary(ident)
    if training:
        parts.append("<h2>Training</h2>")
        parts.append('<p class="note">Training loss, validation AUC and TAR at FAR 1e-3 per epoch.</p>')
        parts.append('<div class="figs">' + "".join(figure(png, source) for source, png in training) + "</div>")
    if results or ident is None:
        parts += verification_sections(folders, results)
    if ident is not None:
        parts += identification.sections(ident)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_page(
    path: Path,
    folders: list[Path],
    results: list[dict],
    roc_png: bytes | None,
    training: list[tuple[str, bytes]],
    identified: Identifications | None = None,
    compared: list[dict] | None = None,
) -> None:
    Path(path).write_text(page(folders, results, roc_png, training, identified, compared), encoding="utf-8")


__all__ = [
    "GENERATOR",
    "comparisons",
    "data_uri",
    "decision_cells",
    "decisions",
    "interval",
    "operating_points",
    "page",
    "provenance",
    "verification_sections",
    "verification_summary",
    "result_figures",
    "write_page",
]
