"""Results folders of `identify` in a report: the identification table (table.md and the page), the CMC and the
identification error tradeoff (each folder's own cmc.png / iet.png, else drawn now from its metrics.json, and
one of each over all identification results for the report folder), the distractor curve, and the page's
identification sections (`pipeline.report.html` places them)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.report import figures
from pipeline.report.markup import esc, figure, interval, render, table, with_ci
from pipeline.report.read import identification_title

log = logging.getLogger(__name__)

FIGURES = {"cmc.png": "cmc", "iet.png": "iet"}
"""The figures of an identification results folder, and of a report with identification results (file: kind)."""
CAPTIONS = {"cmc": "CMC (identification rate over rank)", "iet": "identification error tradeoff (FNIR over FPIR)"}
DRAW = {"cmc": figures.draw_cmc, "iet": figures.draw_iet}
RANKS = (1, 5, 10)
"""The ranks of the identification table."""
FPIR_LEVELS = ("0.001", "0.01", "0.1")
"""The FPIR levels of the table when no result records `fnir_at_fpir` (`identify` records these)."""
DIR_LEVELS = ("0.01",)


@dataclass
class Identifications:
    """The identification results of a report: folders, their metrics (read.read_identification), and the
    figures over all of them as (caption, PNG), those the report folder holds."""

    folders: list[Path]
    results: list[dict]
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def number(value) -> float | None:
    """A finite number of metrics.json as float, else None (absent, null for NaN, not a number)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def rank_rate(metrics: dict, k: int) -> float | None:
    """CMC(k): the fraction of mated searches with the mate within the top k; None beyond --max-rank."""
    cmc = metrics.get("cmc") or []
    return number(cmc[k - 1]) if len(cmc) >= k else None


def levels(results: list[dict], key: str, default: tuple[str, ...]) -> list[str]:
    found = {str(f) for m in results if isinstance(m.get(key), dict) for f in m[key]}
    return sorted(found or default, key=float)


def short_name(metrics: dict) -> str:
    """A result's legend entry: its label, and its distractors when it has any."""
    name = str(metrics.get("label") or metrics.get("model") or "embeddings")
    n = metrics.get("n_distractors")
    return name + (f", {int(n):,} distractors" if n else "")


# ---------------------------------------------------------------------------------------------------- figures


def curve(metrics: dict, kind: str) -> figures.Curve:
    """A result's CMC (ranks 1..R, rates) or IET (FPIR, FNIR at rank 1) from its metrics.json, with its legend."""
    name = short_name(metrics)
    if kind == "cmc":
        rates = np.asarray(metrics["cmc"], dtype=np.float64)
        rank1 = rank_rate(metrics, 1)
        return np.arange(1, len(rates) + 1), rates, name + (f": rank 1 = {rank1:.4f}" if rank1 is not None else "")
    fpir = np.asarray(metrics["iet"]["fpir"], dtype=np.float64)
    fnir = np.asarray(metrics["iet"]["fnir"], dtype=np.float64)
    if fpir.shape != fnir.shape or fpir.ndim != 1:
        raise ValueError(f"iet holds {fpir.size} FPIR and {fnir.size} FNIR values")
    at = number((metrics.get("fnir_at_fpir") or {}).get("0.01"))
    return fpir, fnir, name + (f": FNIR = {at:.4f} at FPIR 0.01" if at is not None else "")


def draw_all(kind: str, results: list[dict], target) -> None:
    """The CMC or IET of every identification result in one figure (a result without the data is left out)."""
    curves = []
    for m in results:
        try:
            curves.append(curve(m, kind))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("no %s curve of %s: %s", kind, short_name(m), e)
    what = "CMC" if kind == "cmc" else "Identification error tradeoff"
    title = (
        f"{what} of {identification_title(results[0])}" if len(results) == 1 else f"{what} of {len(results)} results"
    )
    DRAW[kind](curves, target, title)


def folder_figures(folder: Path, metrics: dict) -> list[tuple[str, bytes]]:
    """(caption, PNG) of an identification folder's CMC and IET: its own file when this tool drew it, else one
    drawn now from its metrics.json."""
    out = []
    for name, kind in FIGURES.items():
        path = Path(folder) / name
        if figures.recognise_figure(path, kind) is None:
            out.append((CAPTIONS[kind], path.read_bytes()))
            continue
        try:
            png = render(DRAW[kind], [curve(metrics, kind)], identification_title(metrics))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("no %s for %s: %s", name, folder, e)
            continue
        out.append((CAPTIONS[kind] + " (drawn by report)", png))
    return out


# ---------------------------------------------------------------------------------------------------- tables


def cells(folders: list[Path], results: list[dict], html: bool) -> tuple[list[str], list[list[str]]]:
    """The identification table, one row per result: trials, rank 1 (with its 95% interval), 5 and 10, FNIR at
    each FPIR, DIR at each FAR, distractors. `html`: HTML cells with every recorded interval; else Markdown."""
    fpirs, fars = levels(results, "fnir_at_fpir", FPIR_LEVELS), levels(results, "dir_at_far", DIR_LEVELS)
    header = ["identification", "trials", *[f"rank {k}" for k in RANKS]]
    header += [f"FNIR at FPIR {f}" for f in fpirs] + [f"DIR at FAR {f}" for f in fars] + ["distractors"]
    rows = []
    for folder, m in zip(folders, results, strict=True):
        label = str(m.get("label") or m.get("model") or Path(folder).name)
        fnir, dir_ = m.get("fnir_at_fpir") or {}, m.get("dir_at_far") or {}
        fnir_ci, dir_ci = m.get("fnir_at_fpir_ci95") or {}, m.get("dir_at_far_ci95") or {}
        values = [(rank_rate(m, k), m.get("cmc_ci95") if k == 1 else None) for k in RANKS]
        values += [(number(fnir.get(f)), fnir_ci.get(f) if isinstance(fnir_ci, dict) else None) for f in fpirs]
        values += [(number(dir_.get(f)), dir_ci.get(f) if isinstance(dir_ci, dict) else None) for f in fars]
        trials = m.get("trials")
        n = number(m.get("n_distractors"))
        row = [
            f"{esc(label)}<br><code>{esc(folder)}</code>" if html else label.replace("|", "\\|"),
            str(len(trials)) if isinstance(trials, list) else "-",
        ]
        if html:
            row += [with_ci(v, ci) for v, ci in values]
        else:  # Markdown: rank 1's interval only, the table stays readable
            bounds = interval(values[0][1])
            row += [f"{v:.4f}" if v is not None else "-" for v, _ in values]
            row[2] += f" [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds and values[0][0] is not None else ""
        rows.append(row + [f"{int(n):,}" if n is not None else "-"])
    return header, rows


def markdown_table(folders: list[Path], results: list[dict]) -> str:
    """The identification table in Markdown (table.md)."""
    header, body = cells(folders, results, html=False)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(vals) + " |" for vals in body]) + "\n"


def distractor_table(metrics: dict) -> str:
    """The distractor curve (rank 1 and FNIR at FPIR 0.01 against the first n distractors), "" without one."""
    points = [p for p in metrics.get("distractor_curve") or [] if isinstance(p, dict)]
    keys = list(dict.fromkeys(k for p in points for k in p))
    if not points:
        return ""
    names = {"distractors": "distractors", "rank1": "rank 1", "fnir_at_fpir_0.01": "FNIR at FPIR 0.01"}
    rows = []
    for p in points:
        vals = [p.get(k) for k in keys]
        rows.append([f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if number(v) is not None else "-" for v in vals])
    note = '<p class="note">Distractor curve: the figures against the first n distractors (store order).</p>'
    return note + table([names.get(k, k) for k in keys], rows)


def description(folder: Path, metrics: dict) -> str:
    """What an identification run was: its folder, searches, and the plain values of its metrics.json."""
    rows = [["results folder", str(folder)]]
    trials = [t for t in metrics.get("trials") or [] if isinstance(t, dict)]
    if trials and all(number(t.get(k)) is not None for t in trials for k in ("n_mated", "n_nonmated")):
        mated, nonmated = (sum(int(t[k]) for t in trials) for k in ("n_mated", "n_nonmated"))
        rows.append(["searches", f"{mated:,} mated, {nonmated:,} non-mated over {len(trials)} trials"])
    for key, value in metrics.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            rows.append([key, str(value)])
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            rows.append([key, ", ".join(value)])
    return table(["", ""], rows, css_class="wrap")


# ---------------------------------------------------------------------------------------------------- page


def summary(ident: Identifications) -> list[str]:
    """The page's identification table and the figures of all identification results."""
    header, body = cells(ident.folders, ident.results, html=True)
    return [
        "<h2>Identification</h2>",
        '<p class="note">Open-set identification (NIST FRTE 1:N), averaged over trials. Rank k: mated searches '
        "with the mate within the top k (CMC). FNIR at FPIR f: mated searches missed at rank 1 with the threshold "
        "that lets a fraction f of the non-mated searches through; DIR at FAR f: 1 - FNIR there. Grey: 95% "
        "intervals, where metrics.json records them.</p>",
        table(header, body, raw=True),
        '<div class="figs">' + "".join(figure(png, caption) for caption, png in ident.figures) + "</div>",
    ]


def sections(ident: Identifications) -> list[str]:
    """One section per identification result: its CMC and IET, its distractor curve, what the run was."""
    parts = ["<h2>Identification results</h2>"]
    for k, (folder, m) in enumerate(zip(ident.folders, ident.results, strict=True)):
        rank1 = rank_rate(m, 1)
        heading = esc(identification_title(m)) + (f": rank 1 {rank1:.4f}" if rank1 is not None else "")
        parts.append(f'<section id="identification-{k}"><h3>{heading}</h3>')
        figs = folder_figures(folder, m)
        parts.append('<div class="figs">' + "".join(figure(png, cap) for cap, png in figs) + "</div>")
        parts.append(distractor_table(m) + description(folder, m) + "</section>")
    return parts


__all__ = [
    "FIGURES",
    "Identifications",
    "cells",
    "curve",
    "description",
    "distractor_table",
    "draw_all",
    "folder_figures",
    "markdown_table",
    "sections",
    "summary",
]
