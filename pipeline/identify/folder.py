"""The results folder of `identify` and of merged identify parts (metrics.json, split.csv, searches.csv,
cmc.png, iet.png), and the part folder of `identify --rows A:B` (part.json, search.npz, split.csv): where it may
go, when an existing one may be replaced, and its writer (a temporary folder beside it, renamed into place)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import outputs
from pipeline.report import figures
from pipeline.report.results import PART_FILE, json_writer, recognise_folder, write_files

log = logging.getLogger(__name__)

STATE_FILE = "search.npz"
IDENTIFY_FILES = ("metrics.json", "split.csv", "searches.csv", "cmc.png", "iet.png", PART_FILE, STATE_FILE)
"""Everything an identify results or part folder holds; a folder holding anything else is not replaced."""
MODE = "identify"


def recognise_identify_folder(path: Path) -> str | None:
    """None when `path` is an empty folder or an identify results/part folder; else what it holds."""
    return recognise_folder(path, IDENTIFY_FILES, lambda m: m.get("mode") == MODE, "identify")


def check_identify_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Before anything is created: a safe location, and an existing folder only with `overwrite` when identify
    wrote it."""
    outputs.check_folder_out(out, inputs=inputs)
    outputs.check_replaceable(out, overwrite, recognise_identify_folder, "results folder of identify")


def write_identify_folder(out: Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write `files` (name -> writer of that path) into a temporary folder beside `out`, then move it into
    place; on any error nothing is left."""
    return write_files(out, files, recognise_identify_folder, IDENTIFY_FILES)


def figure_writers(metrics: dict) -> dict[str, Callable[[Path], None]]:
    """cmc.png and iet.png of a result."""
    label, title = metrics.get("label", ""), f"{metrics.get('label', '')}: open-set identification"
    cmc = np.asarray(metrics["cmc"], dtype=np.float64)
    ranks = np.arange(1, len(cmc) + 1)
    iet = metrics["iet"]
    return {
        "cmc.png": lambda p: figures.draw_cmc([(ranks, cmc, f"{label} rank 1 = {cmc[0]:.4f}")], p, title),
        "iet.png": lambda p: figures.draw_iet([(np.asarray(iet["fpir"]), np.asarray(iet["fnir"]), label)], p, title),
    }


__all__ = ["IDENTIFY_FILES", "STATE_FILE", "MODE", "check_identify_out", "write_identify_folder", "figure_writers",
           "recognise_identify_folder", "json_writer"]  # fmt: skip
