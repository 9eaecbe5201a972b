"""`score --calibrate-on DIR`: a logistic calibration (score -> log-likelihood ratio) fitted on another results
folder's histograms and applied to the scored set's (`pipeline.metrics.calibration`): its Cllr and minCllr into
metrics.json, the reliability figure calibration.png."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.metrics.calibration import bin_scores, cllr, logistic_fit, min_cllr, reliability
from pipeline.metrics.roc import HistogramROC
from pipeline.report import figures
from pipeline.report.read import title_of
from pipeline.report.results import CALIBRATION_FILE, read_json

log = logging.getLogger(__name__)

PRIOR = 0.5
"""The fit's prior: each class weighs half (class-balanced), the result an llr whatever the pairs' mix."""
SAME_SYSTEM = ("model", "layer", "weights")
"""metrics.json keys that should agree between the calibration's source and the scored set."""


def read_source(folder: Path | str, flag: str = "--calibrate-on") -> tuple[HistogramROC, dict]:
    """The histograms and metrics.json of the results folder a calibration is fitted on (or that `flag` reads)."""
    folder = Path(folder)
    if not (folder / "histogram.npz").is_file():
        raise PipelineError(f"{flag} {folder}: no histogram.npz there (give a results folder of `score`)")
    metrics = read_json(folder / "metrics.json", "results") if (folder / "metrics.json").is_file() else {}
    return HistogramROC.load(folder / "histogram.npz"), metrics


def check_source(folder: Path, src: HistogramROC, src_metrics: dict, acc: HistogramROC, metrics: dict,
                 flag: str = "--calibrate-on", what: str = "a calibration") -> None:  # fmt: skip
    """Refuse a source whose scores are of another kind (metric, score offsets, a score file); warn when it
    comes from another network (`flag` and `what` name the option and what it carries in the messages)."""
    if src.binning.metric != acc.binning.metric:
        raise PipelineError(f"{flag} {folder}: its scores are {src.binning.metric}, these "
                            f"{acc.binning.metric}: give a result of the same --metric")  # fmt: skip
    if src_metrics.get("mode") == "scores":
        raise PipelineError(f"{flag} {folder}: it holds another system's scores (score --scores)")
    if "score_norm" in src_metrics and src_metrics["score_norm"] != metrics.get("score_norm"):
        raise PipelineError(f"{flag} {folder}: its score offsets ({src_metrics['score_norm']}) are not "
                            f"these ({metrics.get('score_norm')}): use --no-score-norm on both or neither")  # fmt: skip
    differ = [k for k in SAME_SYSTEM if k in src_metrics and src_metrics[k] != metrics.get(k)]
    if differ:
        log.warning("%s %s: its %s differ from this store's: %s holds for one network", flag, folder,
                    ", ".join(differ), what)  # fmt: skip


def calibrate(metrics: dict, acc: HistogramROC, source: Path | str) -> dict[str, Callable[[Path], None]]:
    """Fit the calibration on `source`'s histograms, apply it to `acc`'s: `metrics` gets `calibration` (slope,
    offset, source, prior, score, cllr, min_cllr and the source's own) and `cllr`, `min_cllr`; returns the
    figure's writer (calibration.png)."""
    source = Path(source)
    src, src_metrics = read_source(source)
    check_source(source, src, src_metrics, acc, metrics)
    try:
        slope, offset = logistic_fit(bin_scores(src.binning), src.pos, src.neg, PRIOR)
    except ValueError as e:
        raise PipelineError(f"--calibrate-on {source}: {e}") from None
    if slope <= 0:
        log.warning("--calibrate-on %s: slope %.3g: there, more alike scores mean less often the same person",
                    source, slope)  # fmt: skip
    own, src_s = bin_scores(acc.binning), bin_scores(src.binning)
    llr = slope * own + offset
    entry = {
        "slope": slope,
        "offset": offset,
        "source": str(source.resolve()),
        "prior": PRIOR,
        "score": "minus Euclidean distance" if acc.binning.metric.low_is_similar else "cosine",
        "cllr": cllr(llr, acc.pos, acc.neg),
        "min_cllr": min_cllr(own, acc.pos, acc.neg),
        "source_cllr": cllr(slope * src_s + offset, src.pos, src.neg),
        "source_min_cllr": min_cllr(src_s, src.pos, src.neg),
    }
    metrics.update(calibration=entry, cllr=entry["cllr"], min_cllr=entry["min_cllr"])
    log.info("Cllr %.4f (minCllr %.4f) with llr = %.4g s %+.4g fitted on %s", entry["cllr"], entry["min_cllr"],
             slope, offset, source)  # fmt: skip
    groups = reliability(llr, acc.pos, acc.neg)
    note = f"llr = {slope:.3g} s {offset:+.3g}; Cllr {entry['cllr']:.3f}, minCllr {entry['min_cllr']:.3f}"
    title = f"{title_of(metrics)}\ncalibrated on {source.name}"
    return {CALIBRATION_FILE: lambda path: figures.draw_calibration(groups, path, title, note)}
