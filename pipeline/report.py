"""Results on disk and on paper: the results folder of one `score` (metrics.json, roc.csv, roc.png,
histogram.npz, written atomically) and `report` of several folders (one ROC figure, the study's table)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.roc import HistogramROC, thin_roc

log = logging.getLogger(__name__)

PROTOCOL_NAMES = {"pairs": "LFWPairs", "people": "LFWPeople", "10fold": "LFW View 2"}
VARIANTS = ("pretrained", "finetuned")


def protocol_name(metrics: dict) -> str:
    p = str(metrics.get("protocol") or "")
    return PROTOCOL_NAMES.get(p, p or metrics.get("mode", "pairs"))


def _plain(v):
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    out: Path, metrics: dict, roc: dict, acc: HistogramROC, log_fpr: bool = False, overwrite: bool = False
) -> Path:
    """Write metrics.json, roc.csv, roc.png and histogram.npz into a temporary folder next to `out` and rename
    it to `out` (an existing `out` is replaced only with `overwrite`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PipelineError(f"results folder {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "metrics.json").write_text(json.dumps(_plain(metrics), indent=2) + "\n")
        fpr, tpr, thr = roc["fpr"], roc["tpr"], roc["threshold"]
        keep = thin_roc(fpr, tpr)
        scale = metrics.get("max_distance") or float("nan")
        with open(tmp / "roc.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fpr", "tpr", "threshold", "threshold_normalised"])
            for k in keep:
                w.writerow([f"{fpr[k]:.9g}", f"{tpr[k]:.9g}", f"{thr[k]:.9g}", f"{thr[k] / scale:.9g}"])
        draw_roc([(fpr[keep], tpr[keep], f"AUC = {metrics['auc']:.4f}")], tmp / "roc.png", title_of(metrics), log_fpr)
        acc.save(tmp / "histogram.npz")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


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


def report(folders: list[Path], out: Path, log_fpr: bool = False) -> str:
    """One ROC figure (out/roc.png) and the study's table (out/table.md) from several results folders."""
    if not folders:
        raise PipelineError("report needs at least one results folder")
    results, curves = [], []
    for folder in folders:
        metrics, fpr, tpr = read_result(folder)
        results.append(metrics)
        curves.append((fpr, tpr, f"{title_of(metrics)}: AUC = {metrics['auc']:.4f}"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = study_table(results)
    (out / "table.md").write_text(table)
    draw_roc(curves, out / "roc.png", "ROC of " + ", ".join(sorted({protocol_name(m) for m in results})), log_fpr)
    log.info("wrote %s and %s", out / "table.md", out / "roc.png")
    return table
