"""A results folder (of `score` or of `identify`) read back, and the names a report gives its result: the
protocol's name, a figure's title, the study's cells. Below the results-folder writer, the tables and the page,
which all name results alike."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PROTOCOL_NAMES = {"pairs": "LFWPairs", "people": "LFWPeople", "10fold": "LFW View 2", "folder": "folder (all pairs)",
                  "pairs-file": "folder (listed pairs)", "bin": ".bin pairs"}  # fmt: skip
VARIANTS = ("pretrained", "finetuned")
IDENTIFY_MODE = "identify"
"""metrics.json's `mode` in a results folder of `identify`."""


def protocol_name(metrics: dict) -> str:
    p = str(metrics.get("protocol") or "")
    return PROTOCOL_NAMES.get(p, p or metrics.get("mode", "pairs"))


def title_of(metrics: dict) -> str:
    label = str(metrics.get("label") or metrics.get("model") or "embeddings")
    parts = [label]
    if metrics.get("variant") and metrics["variant"].replace("finetuned", "fine-tuned") not in label:
        parts.append(f"({'fine-tuned' if metrics['variant'] == 'finetuned' else metrics['variant']})")
    parts.append(f"- {protocol_name(metrics)}")
    if metrics.get("image_set"):
        parts.append(f"[{metrics['image_set']}]")
    return " ".join(parts)


def read_result(folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, fpr, tpr) of a results folder."""
    folder = Path(folder)
    mpath, rpath = folder / "metrics.json", folder / "roc.csv"
    if not mpath.is_file() or not rpath.is_file():
        raise PipelineError(f"{folder} is not a results folder of `score` (no metrics.json / roc.csv)")
    metrics = json.loads(mpath.read_text())
    data = np.loadtxt(rpath, delimiter=",", skiprows=1, ndmin=2)
    return metrics, data[:, 0], data[:, 1]


def is_identification(folder: Path) -> bool:
    """Whether `folder` is a results folder of `identify` (its metrics.json says `"mode": "identify"`)."""
    try:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("mode") == IDENTIFY_MODE


def read_identification(folder: Path) -> dict:
    """The metrics of a results folder of `identify` (metrics.json with `mode` "identify" and a `cmc` list)."""
    path = Path(folder) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{folder} is not a results folder of `identify` ({path}: {e})") from e
    if (
        not isinstance(metrics, dict)
        or metrics.get("mode") != IDENTIFY_MODE
        or not isinstance(metrics.get("cmc"), list)
    ):
        raise PipelineError(f"{folder} is not a results folder of `identify` (no mode identify and cmc in {path})")
    return metrics


def identification_title(metrics: dict) -> str:
    """An identification result's name in figures and headings: label, metric, template, distractors."""
    label = str(metrics.get("label") or metrics.get("model") or "embeddings")
    how = [str(metrics["metric"])] if metrics.get("metric") else []
    how += [f"{metrics['template']} template"] if metrics.get("template") else []
    how += [f"{int(metrics['n_distractors']):,} distractors"] if metrics.get("n_distractors") else []
    return f"{label} - identification" + (f" ({', '.join(how)})" if how else "")


def study_cells(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The study's layout: header and rows (one per model; per protocol pretrained / fine-tuned / improvement)."""
    protocols: list[str] = []
    rows: dict[str, dict[tuple[str, str], float]] = {}
    for m in results:
        proto = protocol_name(m)
        if proto not in protocols:
            protocols.append(proto)
        row = str(m.get("model") or m.get("label") or "?")
        if m.get("image_set"):
            row += f" ({m['image_set']})"
        cell = (proto, m.get("variant") or "pretrained")
        if cell in rows.setdefault(row, {}):
            log.warning("two results for %s %s %s: keeping the later one", row, *cell)
        rows[row][cell] = float(m["auc"])
    header = ["model"]
    for p in protocols:
        header += [f"{p} pretrained", f"{p} fine-tuned", f"{p} improvement"]
    body = []
    for row, cells in rows.items():
        vals = [row]
        for p in protocols:
            pre, fine = cells.get((p, "pretrained")), cells.get((p, "finetuned"))
            vals += [f"{pre:.4f}" if pre is not None else "-", f"{fine:.4f}" if fine is not None else "-"]
            vals.append(f"{fine - pre:+.4f}" if pre is not None and fine is not None else "-")
        body.append(vals)
    return header, body


__all__ = [
    "PROTOCOL_NAMES",
    "VARIANTS",
    "protocol_name",
    "title_of",
    "read_result",
    "study_cells",
    "IDENTIFY_MODE",
    "identification_title",
    "is_identification",
    "read_identification",
]
