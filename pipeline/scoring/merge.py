"""`merge`: add the histograms of `score --all-pairs --rows A:B` parts (job arrays, no torchrun) into one
result. Parts must come from the same store with the same metric, bins, bin range, tile side and sample seed,
and their row ranges must not overlap; when they cover every row the full results folder is written
(metrics.json, roc.csv, roc.png, histogram.npz), otherwise a part folder that can be merged further."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.metrics.binning import as_metric
from pipeline.metrics.curve import check_defined
from pipeline.metrics.roc import HistogramROC
from pipeline.outputs import claim
from pipeline.report.results import (
    PART_FILE,
    RESULT_FILES,
    check_results_out,
    json_writer,
    read_json,
    write_folder,
    write_results,
)
from pipeline.scoring.assemble import TIMINGS, full_metrics, summed_timings
from pipeline.scoring.blockmath import better_extreme

log = logging.getLogger(__name__)

SAME = ("store_n", "store_dim", "store_size", "metric", "score_norm", "bins", "bin_lo", "bin_hi", "block", "leaf",
        "seed", "sample_pairs")  # fmt: skip


@dataclass(frozen=True)
class MergeConfig:
    """Which part folders to add up, and where the result goes."""

    parts: tuple[Path, ...]
    """Folders written by `score --all-pairs --rows A:B --out DIR` (or by an earlier merge)."""
    out: Path
    """The merged folder: full results when the parts cover every row, else a part folder."""
    overwrite: bool = False
    """Replace an existing folder."""
    log_fpr: bool = False
    """Logarithmic false-positive-rate axis in roc.png."""

    def __post_init__(self):
        if not self.parts:
            raise ValueError("merge needs at least one part folder")


def load_part(folder: Path) -> tuple[dict, HistogramROC]:
    info_path = Path(folder) / PART_FILE
    if not info_path.is_file():
        raise PipelineError(f"{folder} is no --rows part: it has no {PART_FILE} (write parts with score --rows A:B)")
    info = read_json(info_path, "part description")
    acc = HistogramROC.load(Path(folder) / "histogram.npz")
    return info, acc


def merge(cfg: MergeConfig) -> dict:
    """Check and add the parts; write `cfg.out`; return the merged part.json dict."""
    out = Path(cfg.out)
    with claim(out, lambda: check_results_out(out, cfg.overwrite, list(cfg.parts)), RESULT_FILES):
        return _merge(cfg)


def _merge(cfg: MergeConfig) -> dict:
    loaded = [load_part(p) for p in cfg.parts]
    first, acc = loaded[0][0], None
    for folder, (info, part) in zip(cfg.parts, loaded, strict=True):
        differ = [f"{k} {info.get(k)!r} vs {first.get(k)!r}" for k in SAME if info.get(k) != first.get(k)]
        if differ:
            raise PipelineError(
                f"cannot merge {folder} with {cfg.parts[0]}: {'; '.join(differ)}. Score every part of one store "
                f"with the same --metric, --bins, --block and --seed (and --no-score-norm on all parts or none)."
            )
        if info["store"] != first["store"]:
            log.warning("%s scored %s, %s scored %s (same size: merging)", folder, info["store"], cfg.parts[0],
                        first["store"])  # fmt: skip
        acc = part if acc is None else acc.merge(part)
    ranges = sorted(r for info, _ in loaded for r in _ranges_of(info))
    for (a0, b0), (a1, b1) in zip(ranges, ranges[1:], strict=False):
        if a1 < b0:
            raise PipelineError(f"parts overlap: rows {a0}:{b0} and {a1}:{b1} (their pairs would count twice)")
    infos = [info for info, _ in loaded]
    write_part(Path(cfg.out), infos, acc, log_fpr=cfg.log_fpr)
    merged = read_json(Path(cfg.out) / PART_FILE, "part description")
    merged["complete"] = covered(infos) == [[0, first["store_n"]]]
    return merged


__all__ = ["MergeConfig", "merge", "load_part"]


# ---------------------------------------------------------------------------------------------------- folders


def covered(parts: list[dict]) -> list[list[int]]:
    """The union of the parts' row ranges as sorted disjoint [A, B) ranges."""
    out: list[list[int]] = []
    for a, b in sorted(r for p in parts for r in _ranges_of(p)):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _ranges_of(p: dict) -> list[list[int]]:
    return p["ranges"] if "ranges" in p else [p["rows"]]


def write_part(out: Path, parts: list[dict], acc: HistogramROC, log_fpr: bool = False) -> None:
    """A part folder (part.json, histogram.npz); the full results folder (metrics.json, roc.csv, roc.png as
    `score` writes them, plus part.json) when the parts cover every row of the store."""
    first = parts[0]
    ranges = covered(parts)
    extreme = (float("nan"), -1, -1, -1)
    for p in parts:
        extreme = better_extreme(extreme, tuple(p["extreme"]), as_metric(first["metric"]))
    summed = ("rows", "extreme", "n_pairs", "n_positive", "seconds", *TIMINGS)
    info = {k: v for k, v in first.items() if k not in summed}
    max_d = next((p["max_distance"] for p in parts if list(p["extreme"]) == list(extreme)), acc.max_distance)
    info.update(
        ranges=ranges,
        parts=sum(p.get("parts", 1) for p in parts),
        n_pairs=sum(p["n_pairs"] for p in parts),
        n_positive=acc.n_positive,
        extreme=list(extreme),
        max_distance=max_d,
        seconds=sum(p["seconds"] for p in parts),
        **summed_timings([{"seconds_prepare": 0.0, "seconds_tiles": p["seconds"], **p} for p in parts]),
    )
    acc.max_distance = max_d
    complete = ranges == [[0, first["store_n"]]]
    if complete:
        n = first["store_n"]
        if info["n_pairs"] != n * (n - 1) // 2:
            raise RuntimeError(f"internal error: the parts hold {info['n_pairs']} pairs of {n * (n - 1) // 2}")
        check_defined(acc.n_positive, acc.n_negative)
        metrics = full_metrics(info, acc)
        roc = metrics.pop("roc")
        write_results(out, metrics, roc, acc, log_fpr=log_fpr, part=info)
    else:
        write_folder(out, {PART_FILE: json_writer(info, null_nan=False)}, acc)
