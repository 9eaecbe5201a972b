"""Every figure the tool draws, in one place: ROC, DET and score distributions of a result (`score`, `merge`,
`report`), CMC and identification error tradeoff of an identification result (`identify`, `report`), the
calibration's reliability; the training curves of `finetune` and `run` are in `pipeline.report.training`. Each is a PNG written by matplotlib (Agg) with a `Description` text
chunk naming this tool and the kind of figure, so a later run can tell its own figures from a user's
(`recognise_figure`). A target is a path or a binary file object (the HTML report renders to memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.metrics.roc import HistogramROC, value_to_distance

MARK = "lfw-verify"
"""The PNG `Description` chunk of every figure starts with this, then the figure's kind."""
DPI = 110
VAL_FAR = 1e-3
"""The false accept rate of the marked operating point (scores figure, training curves)."""

Curve = tuple[np.ndarray, np.ndarray, str]
"""(false positive rate, true positive rate, legend label), ROC points ordered most similar first."""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, target, kind: str) -> None:
    """Write `fig` as a PNG marked as this tool's figure of `kind`, and free it."""
    plt = pyplot()
    try:
        fig.savefig(target, dpi=DPI, format="png", metadata={"Description": f"{MARK} {kind}"})
    finally:
        plt.close(fig)


def recognise_figure(path: Path | str, kind: str | None = None, legacy: bool = False) -> str | None:
    """None when `path` is a PNG this tool drew (of `kind`, when given); else what it is. `legacy` also accepts
    any matplotlib PNG (figures written before they were marked)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"\x89PNG"):
        return "it is not a PNG image"
    mark = f"{MARK} {kind}" if kind else MARK
    if b"Description\x00" + mark.encode() in head:
        return None
    if legacy and b"matplotlib" in head.lower():
        return None
    return f"it is not a {kind + ' ' if kind else ''}figure written by this tool"


# ---------------------------------------------------------------------------------------------------- results


def draw_roc(curves: Sequence[Curve], target, title: str, log_fpr: bool = False) -> None:
    """The study's ROC figure: TPR over FPR, chance diagonal, one legend entry per curve with its AUC."""
    plt = pyplot()
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
    save(fig, target, "roc")


def draw_det(curves: Sequence[Curve], target, title: str) -> None:
    """Detection error trade-off (NIST style): false non-match rate (1 - TPR) over false match rate (FPR), both
    axes logarithmic, lower left is better; the dashed diagonal FMR = FNMR crosses each curve at its EER."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    lo = 1.0
    for fpr, tpr, label in curves:
        fpr, fnmr = np.asarray(fpr, dtype=np.float64), 1.0 - np.asarray(tpr, dtype=np.float64)
        keep = (fpr > 0) & (fnmr > 0)
        if keep.any():
            lo = min(lo, fpr[keep].min(), fnmr[keep].min())
        ax.plot(fpr[keep], fnmr[keep], lw=1.5, label=label)
    lo = 10 ** math.floor(math.log10(max(lo, 1e-9)))
    if lo >= 1:
        lo = 1e-3
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="FMR = FNMR (EER)")
    _log_log(fig, ax, target, "det", ((lo, 1), (lo, 1)),
             ("False match rate (FMR, log)", "False non-match rate (FNMR, log)"), title, "lower left")  # fmt: skip


def _log_log(fig, ax, target, kind: str, limits: tuple, labels: tuple[str, str], title: str, legend: str) -> None:
    """Both axes logarithmic with these limits and labels, the title, the legend and grids; saved as `kind`."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=10)
    ax.legend(loc=legend, fontsize=8)
    ax.grid(which="major", alpha=0.4)
    ax.grid(which="minor", alpha=0.12)
    fig.tight_layout()
    save(fig, target, kind)


IET_FPIR = (1e-3, 1e-2, 1e-1)
"""The FPIR levels marked in the identification error tradeoff (those of metrics.json's `fnir_at_fpir`)."""


def _decade_below(value: float) -> float:
    return 10.0 ** math.floor(math.log10(max(value, 1e-9)))


def draw_cmc(curves: Sequence[Curve], target, title: str) -> None:
    """Cumulative match characteristic of open-set searches: the identification rate (mated searches whose mate
    is within the top k) over the rank k = 1..R, rank 1 marked. Curves are (ranks, rates, legend label). The y
    axis starts at 0, or, when every rate is above 0.5, at a multiple of 0.05 just below the lowest."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 5.5))
    lowest, last = 1.0, 1
    for ranks, rates, label in curves:
        ranks, rates = np.asarray(ranks, dtype=np.float64), np.asarray(rates, dtype=np.float64)
        keep = np.isfinite(ranks) & np.isfinite(rates)
        if not keep.any():
            continue
        ranks, rates = ranks[keep], rates[keep]
        (line,) = ax.plot(ranks, rates, lw=1.5, label=label)
        ax.plot(ranks[:1], rates[:1], "o", ms=5, color=line.get_color())
        lowest, last = min(lowest, float(rates.min())), max(last, int(ranks.max()))
    ax.set_ylim(max(0.0, math.floor((lowest - 0.02) * 20) / 20) if lowest > 0.5 else 0.0, 1.01)
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate (mate within the rank)")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, target, "cmc")


def draw_iet(curves: Sequence[Curve], target, title: str) -> None:
    """Identification error tradeoff (NIST FRTE 1:N): false negative identification rate (FNIR, rank 1) over
    false positive identification rate (FPIR), both axes logarithmic, lower left is better, dotted lines at FPIR
    1e-3, 1e-2 and 1e-1. Curves are (FPIR, FNIR, legend label). Points with FPIR 0 have no place on the log axis
    and are dropped; FNIR 0 (no mate missed) is drawn on the bottom edge. FPIR runs from 1e-4 (or the decade
    below the smallest positive FPIR) to 1."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    kept = []
    for fpir, fnir, label in curves:
        fpir, fnir = np.asarray(fpir, dtype=np.float64), np.asarray(fnir, dtype=np.float64)
        keep = np.isfinite(fpir) & np.isfinite(fnir) & (fpir > 0)
        kept.append((fpir[keep], fnir[keep], label))
    xs = [f.min() for f, _, _ in kept if f.size]
    ys = [n[n > 0].min() for _, n, _ in kept if (n > 0).any()]
    xlo = _decade_below(min([1e-4, *xs]))
    ylo = min(_decade_below(min(ys)), 0.1) if ys else 1e-3
    for fpir, fnir, label in kept:
        ax.plot(fpir, np.clip(fnir, ylo, 1.0), lw=1.5, label=label)
    for k, level in enumerate(IET_FPIR):
        ax.axvline(level, color="grey", ls=":", lw=1, label="FPIR 0.001, 0.01, 0.1" if k == 0 else None)
    labels = (
        "False positive identification rate (FPIR, log)",
        "False negative identification rate (FNIR, rank 1, log)",
    )
    _log_log(fig, ax, target, "iet", ((xlo, 1), (ylo, 1.05)), labels, title, "best")


def operating_thresholds(metrics: dict, roc: dict | None) -> dict[str, float]:
    """Distance thresholds (the metric's unit: Euclidean distance, or 1 - cosine) of the EER and of TAR at FAR
    1e-3: `eer_threshold` / `threshold_at_far["0.001"]` when metrics.json holds them, else read off the ROC
    points (`fpr`, `tpr`, `threshold`, most similar first). A point that accepts nothing is left out, and so is
    FAR 1e-3 where metrics.json holds its TAR as null (not measurable: the ROC would give the threshold at FAR 0)."""
    out: dict[str, float] = {}
    far_key = f"{VAL_FAR:g}"
    tar = metrics.get("tar_at_far") or {}
    unmeasurable = far_key in tar and tar[far_key] is None
    given_far = (metrics.get("threshold_at_far") or {}).get(far_key) if isinstance(metrics, dict) else None
    if metrics.get("eer_threshold") is not None:
        out["eer"] = float(metrics["eer_threshold"])
    if given_far is not None:
        out["far"] = float(given_far)
    if roc is None or ("eer" in out and ("far" in out or unmeasurable)):
        return out
    fpr, tpr, thr = (np.asarray(roc[k], dtype=np.float64) for k in ("fpr", "tpr", "threshold"))
    if len(fpr) < 2:
        return out
    diff = fpr - (1.0 - tpr)
    if "eer" not in out and (diff >= 0).any():
        k = int(np.argmax(diff >= 0))
        if k > 0:
            out["eer"] = float(thr[k])
    if "far" not in out and not unmeasurable:
        k = int(np.flatnonzero(fpr <= VAL_FAR)[-1])
        if k > 0 and tpr[k] > 0:
            out["far"] = float(thr[k])
    return out


def score_densities(acc: HistogramROC, n_bins: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(edges, same-person density, different-person density, x label) from the two histograms, re-binned
    into `n_bins` equal bins over the occupied range, in the metric's unit: Euclidean distance (l2) or cosine."""
    b = acc.binning
    edges = b.edges()
    centres = 0.5 * (edges[:-1] + edges[1:])
    if b.metric == "l2":
        x, label = value_to_distance(centres, "l2"), "Euclidean distance (small = same person)"
    else:
        x, label = centres, "cosine similarity (large = same person)"
    occupied = (acc.pos + acc.neg) > 0
    lo, hi = (float(x[occupied].min()), float(x[occupied].max())) if occupied.any() else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    grid = np.linspace(lo - pad, hi + pad, n_bins + 1)
    width = grid[1] - grid[0]
    dens = []
    for counts in (acc.pos, acc.neg):
        h, _ = np.histogram(x, bins=grid, weights=counts.astype(np.float64))
        dens.append(h / (h.sum() * width) if h.sum() > 0 else h)
    return grid, dens[0], dens[1], label


def draw_scores(acc: HistogramROC, target, title: str, thresholds: dict[str, float], metrics: dict) -> None:
    """Same-person and different-person score distributions (each density-normalised) from the result's two
    histograms, with the EER threshold and the threshold of TAR at FAR 1e-3 as vertical lines."""
    plt = pyplot()
    grid, pos, neg, xlabel = score_densities(acc)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.stairs(neg, grid, fill=True, alpha=0.35, color="tab:red", label=f"different person (n = {acc.n_negative:,})")
    ax.stairs(pos, grid, fill=True, alpha=0.35, color="tab:blue", label=f"same person (n = {acc.n_positive:,})")
    ax.stairs(neg, grid, color="tab:red", lw=1)
    ax.stairs(pos, grid, color="tab:blue", lw=1)
    cosine = acc.binning.metric == "cosine"
    tar = (metrics.get("tar_at_far") or {}).get(f"{VAL_FAR:g}")
    marks = {
        "eer": (
            "k",
            "--",
            "EER threshold" + (f" (EER {metrics['eer']:.3f})" if metrics.get("eer") is not None else ""),
        ),
        "far": ("tab:green", ":", f"threshold at FAR {VAL_FAR:g}" + (f" (TAR {tar:.3f})" if tar is not None else "")),
    }
    for key, (colour, style, label) in marks.items():
        if key in thresholds and math.isfinite(thresholds[key]):
            ax.axvline(
                1.0 - thresholds[key] if cosine else thresholds[key], color=colour, ls=style, lw=1.2, label=label
            )
    ax.set_xlim(grid[0], grid[-1])
    if cosine and metrics.get("score_norm"):  # cohort score normalisation: cos - o_i - o_j
        xlabel = "cosine similarity - both offsets (cohort normalised; large = same person)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right" if not cosine else "upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, target, "scores")


def draw_calibration(groups: dict[str, np.ndarray], target, title: str, note: str) -> None:
    """Reliability of a calibration (`pipeline.metrics.calibration.reliability`): per group of scores, the
    observed same-person rate at equal priors over the predicted one (left), and the same in log-likelihood
    ratios (right, groups of one class left out); the diagonal is perfect calibration. `note`: the legend's
    text (the fit and its Cllr)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.8))
    size = 12 + 60 * np.sqrt(groups["pairs"] / max(float(groups["pairs"].max()), 1.0))
    left.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    left.plot(groups["predicted"], groups["observed"], "-", color="tab:blue", lw=1)
    left.scatter(groups["predicted"], groups["observed"], s=size, color="tab:blue", zorder=3, label=note)
    left.set_xlim(-0.02, 1.02)
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("predicted same-person probability (equal priors)")
    left.set_ylabel("observed same-person rate (equal priors)")
    left.legend(loc="upper left", fontsize=8)
    finite = np.isfinite(groups["observed_llr"])
    x, y = groups["predicted_llr"][finite], groups["observed_llr"][finite]
    span = [float(min(x.min(), y.min())), float(max(x.max(), y.max()))] if finite.any() else [-1.0, 1.0]
    right.plot(span, span, "k--", lw=0.8)
    right.plot(x, y, "-o", color="tab:blue", lw=1, ms=4)
    right.set_xlabel("predicted log-likelihood ratio (mean of the group)")
    right.set_ylabel("observed log-likelihood ratio")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, target, "calibration")


__all__ = [
    "IET_FPIR",
    "MARK",
    "VAL_FAR",
    "draw_cmc",
    "draw_det",
    "draw_iet",
    "draw_roc",
    "draw_scores",
    "operating_thresholds",
    "recognise_figure",
    "save",
    "score_densities",
]
