"""Results on paper: the ROC figure of one result, and `report` of several results folders (one ROC figure,
the study's table)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline import outputs
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PROTOCOL_NAMES = {"pairs": "LFWPairs", "people": "LFWPeople", "10fold": "LFW View 2"}
VARIANTS = ("pretrained", "finetuned")
REPORT_FILES = ("table.md", "roc.png")


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


def draw_roc(curves: list[tuple[np.ndarray, np.ndarray, str]], path: Path, title: str, log_fpr: bool = False) -> None:
    """The study's ROC figure: TPR over FPR, chance diagonal, one legend entry per curve with its AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for fpr, tpr, label in curves:
        ax.plot(fpr, tpr, lw=1.5, label=label)
    if log_fpr:
        positive = [f[f > 0].min() for f, _, _ in curves if (f > 0).any()]
        lo = max(min(positive, default=1e-6), 1e-9)
        grid = np.logspace(np.log10(lo), 0, 100)
        ax.plot(grid, grid, "k--", lw=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_xlim(lo, 1)
    else:
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate" + (" (log)" if log_fpr else ""))
    ax.set_ylabel("True positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def read_result(folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, fpr, tpr) of a results folder."""
    folder = Path(folder)
    mpath, rpath = folder / "metrics.json", folder / "roc.csv"
    if not mpath.is_file() or not rpath.is_file():
        raise PipelineError(f"{folder} is not a results folder of `score` (no metrics.json / roc.csv)")
    metrics = json.loads(mpath.read_text())
    data = np.loadtxt(rpath, delimiter=",", skiprows=1, ndmin=2)
    return metrics, data[:, 0], data[:, 1]


def study_table(results: list[dict]) -> str:
    """Markdown in the study's layout: one row per model, per protocol pretrained / fine-tuned / improvement."""
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
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row, cells in rows.items():
        vals = [row]
        for p in protocols:
            pre, fine = cells.get((p, "pretrained")), cells.get((p, "finetuned"))
            vals += [f"{pre:.4f}" if pre is not None else "-", f"{fine:.4f}" if fine is not None else "-"]
            vals.append(f"{fine - pre:+.4f}" if pre is not None and fine is not None else "-")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def recognise_report_file(path: Path) -> str | None:
    """None when `path` is a table.md or a PNG figure that this tool wrote; else what it is."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix == ".md":
        return None if head.startswith(b"| model |") else "it is not a table written by report"
    if head.startswith(b"\x89PNG") and b"matplotlib" in head.lower():
        return None
    return "it is not a figure written by this tool"


def report(folders: list[Path], out: Path, log_fpr: bool = False, overwrite: bool = False) -> str:
    """One ROC figure (out/roc.png) and the study's table (out/table.md) from several results folders; an
    existing table or figure is replaced only with `overwrite`, and only when this tool wrote it."""
    if not folders:
        raise PipelineError("report needs at least one results folder")
    out = Path(out)
    outputs.check_folder_out(out, inputs=folders, holds_inputs=False)
    results, curves = [], []
    for folder in folders:
        metrics, fpr, tpr = read_result(folder)
        results.append(metrics)
        curves.append((fpr, tpr, f"{title_of(metrics)}: AUC = {metrics['auc']:.4f}"))
    for name in REPORT_FILES:
        outputs.check_replaceable(out / name, overwrite, recognise_report_file, "report file")
    out.mkdir(parents=True, exist_ok=True)
    table = study_table(results)
    title = "ROC of " + ", ".join(sorted({protocol_name(m) for m in results}))
    with outputs.output_lock(out / "table.md"):
        for name in REPORT_FILES:  # checked again under the lock: another run may have written them since
            outputs.check_replaceable(out / name, overwrite, recognise_report_file, "report file")
        outputs.replace_file(lambda p: p.write_text(table), out / "table.md")
        outputs.replace_file(lambda p: draw_roc(curves, p, title, log_fpr), out / "roc.png")
    log.info("wrote %s and %s", out / "table.md", out / "roc.png")
    return table
