"""The results folder of `score` and `merge` (metrics.json, roc.csv, roc.png, det.png, scores.png,
histogram.npz, and part.json for `--rows` parts): where it may go, when an existing one may be replaced, and its
one writer (a temporary folder beside it, renamed into place)."""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.metrics.roc import HistogramROC, thin_roc
from pipeline.report import figures
from pipeline.report.read import title_of

log = logging.getLogger(__name__)

PART_FILE = "part.json"
FIGURE_FILES = ("roc.png", "det.png", "scores.png")
"""The figures of a results folder (`pipeline.report.figures`); folders of older versions hold only roc.png."""
EXPORT_FILES = ("scores.bob4", "scores.csv")
"""The listed pairs' scores, written with `score --export`."""
CALIBRATION_FILE = "calibration.png"
"""The reliability figure of `score --calibrate-on` (`pipeline.scoring.calibrate`)."""
RESULT_FILES = ("metrics.json", "roc.csv", *FIGURE_FILES, CALIBRATION_FILE, "histogram.npz", PART_FILE, *EXPORT_FILES)
"""Everything a results or part folder holds (some may be missing); a folder holding anything else is not
replaced."""


def plain(v):
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return plain(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def recognise_folder(path: Path, own_files: tuple[str, ...], ours: Callable[[dict], bool], tool: str) -> str | None:
    """None when `path` is an empty folder, or holds only `own_files` (regular files) with a metrics.json or
    part.json that `ours` accepts; else what it holds. `tool` names the command in the answer."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder" if not path.is_symlink() else "it is a symbolic link"
    entries = list(path.iterdir())
    foreign = sorted(p.name for p in entries if p.name not in own_files or p.is_symlink() or not p.is_file())
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return f"it holds {', '.join(foreign[:5])}{more}, which {tool} does not write"
    if not entries:
        return None
    for name in ("metrics.json", PART_FILE):
        try:
            value = json.loads((path / name).read_text())
        except (OSError, ValueError, TypeError):
            continue
        if isinstance(value, dict) and ours(value):
            return None
    return f"it has no metrics.json or part.json written by {tool}"


def recognise_results_folder(path: Path) -> str | None:
    """None when `path` is an empty folder or a results/part folder of `score`/`merge`; else what it holds."""
    return recognise_folder(path, RESULT_FILES, lambda m: "n_pairs" in m, "score")


def json_attrs(attrs: dict) -> dict:
    """A store's attributes as JSON-safe Python values (numpy scalars and arrays, bytes)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        out[k] = v
    return out


def guess_variant(attrs: dict) -> str:
    """finetuned when the store's weights are a `finetune` checkpoint, else pretrained."""
    weights = str(attrs.get("weights", ""))
    if weights in ("", "imagenet", "none") or not Path(weights).is_file():
        return "finetuned" if "finetune" in weights.lower() else "pretrained"
    try:
        from pipeline.nets.models import read_weights_file  # torch: only for stores made from a weights file

        return "finetuned" if read_weights_file(weights)[1] else "pretrained"
    except PipelineError:
        return "pretrained"


def describe(attrs: dict, store: Path, label: str | None, variant: str | None) -> dict:
    """What every metrics.json says about its store: model, protocol, image set, layer, weights, the variant
    (pretrained or finetuned, guessed when not given), the label of legends, the store and its provenance."""
    return {
        "model": attrs.get("model", ""),
        "protocol": attrs.get("protocol", ""),
        "image_set": attrs.get("image_set", ""),
        "layer": attrs.get("layer", ""),
        "weights": attrs.get("weights", ""),
        "variant": variant or guess_variant(attrs),
        "label": label or f"{attrs.get('model', Path(store).stem)}",
        "store": str(Path(store).resolve()),
        "provenance": attrs,
    }


def check_results_out(out: Path, overwrite: bool, inputs: list[Path], data_root: str | None = None) -> None:
    """Before anything is created: a safe location, and an existing folder only with `overwrite` when it is a
    results folder (exit 2 otherwise, with what is there)."""
    outputs.check_folder_out(out, inputs=inputs, data_root=data_root or None)
    outputs.check_replaceable(out, overwrite, recognise_results_folder, "results folder")


def json_writer(obj: dict, null_nan: bool = True):
    """A writer of `obj` as indented JSON: NaN/inf as null (`plain`), or as JSON's NaN literals (part.json keeps
    them: `merge` compares them)."""
    text = json.dumps(plain(obj) if null_nan else obj, indent=2) + "\n"
    return lambda path: Path(path).write_text(text)


def write_files(out: Path, files: dict[str, Callable[[Path], None]], recognise: outputs.Recognise,
                own_files: tuple[str, ...]) -> Path:  # fmt: skip
    """Write `files` (name -> writer taking the path) into a temporary folder beside `out`, then move it into place
    (`outputs.replace_folder`: an existing `out` only when `recognise` says it is ours); on any error nothing is
    left of the new folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)
        for name, write in files.items():
            write(tmp / name)
        outputs.replace_folder(tmp, out, recognise, own_files)
    except OSError as e:
        outputs.remove_own_files(tmp, own_files)
        raise PipelineError(
            f"cannot write the results folder {out}: {outputs.io_cause(e)}; nothing was written"
        ) from None
    except BaseException:
        outputs.remove_own_files(tmp, own_files)
        raise
    log.info("wrote %s", out)
    return out


def write_folder(out: Path, files: dict[str, Callable[[Path], None]], acc: HistogramROC) -> Path:
    """Write `files` (name -> writer taking the path) and `histogram.npz` into a temporary folder beside `out`,
    then move it into place (`write_files`)."""
    return write_files(out, {**files, "histogram.npz": acc.save}, recognise_results_folder, RESULT_FILES)


def write_results(
    out: Path,
    metrics: dict,
    roc: dict,
    acc: HistogramROC,
    log_fpr: bool = False,
    part: dict | None = None,
    more: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """The full results folder: metrics.json, roc.csv, histogram.npz, the figures roc.png, det.png (FNMR over
    FMR) and scores.png (the two score distributions), part.json for merged parts, and `more` files (name ->
    writer: the exported scores)."""
    fpr, tpr, thr = roc["fpr"], roc["tpr"], roc["threshold"]
    keep = thin_roc(fpr, tpr)
    scale = metrics.get("max_distance") or float("nan")

    def roc_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fpr", "tpr", "threshold", "threshold_normalised"])
            for k in keep:
                w.writerow([f"{fpr[k]:.9g}", f"{tpr[k]:.9g}", f"{thr[k]:.9g}", f"{thr[k] / scale:.9g}"])

    title = title_of(metrics)

    def roc_png(path: Path) -> None:
        figures.draw_roc([(fpr[keep], tpr[keep], f"AUC = {metrics['auc']:.4f}")], path, title, log_fpr)

    def det_png(path: Path) -> None:
        figures.draw_det([(fpr[keep], tpr[keep], f"EER = {metrics['eer']:.4f}")], path, title)

    def scores_png(path: Path) -> None:
        figures.draw_scores(acc, path, title, figures.operating_thresholds(metrics, roc), metrics)

    files = {
        "metrics.json": json_writer(metrics),
        "roc.csv": roc_csv,
        "roc.png": roc_png,
        "det.png": det_png,
        "scores.png": scores_png,
    }
    if part is not None:
        files[PART_FILE] = json_writer(part, null_nan=False)
    return write_folder(out, {**files, **(more or {})}, acc)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a results folder; unreadable or malformed is a PipelineError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(value, dict):
        raise PipelineError(f"{path} is not a {what}: it holds no JSON object")
    return value


__all__ = [
    "CALIBRATION_FILE",
    "FIGURE_FILES",
    "PART_FILE",
    "RESULT_FILES",
    "plain",
    "json_attrs",
    "guess_variant",
    "describe",
    "recognise_results_folder",
    "check_results_out",
    "json_writer",
    "write_folder",
    "write_results",
    "read_json",
]
