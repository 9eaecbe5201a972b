"""The open-set protocol of `identify`: trials that split a labelled store's rows into a gallery (enrolled
images), mated probes (the enrolled people's other images) and non-mated probes (every image of the people not
enrolled), drawn with a seed (the BLUFR layout, Liao et al. 2014) or read from the user's `split.csv`."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

ROLES = ("gallery", "mated", "nonmated")
SPLIT_HEADER = ["trial", "row", "role"]


@dataclass
class Trial:
    """One split: store rows (sorted) of each role."""

    gallery: np.ndarray
    mated: np.ndarray
    nonmated: np.ndarray

    @property
    def probes(self) -> np.ndarray:
        return np.union1d(self.mated, self.nonmated)


def eligible_people(labels: np.ndarray, images: int) -> np.ndarray:
    """The people with at least `images` + 1 images (one left as a mated probe), sorted."""
    ids, counts = np.unique(labels, return_counts=True)
    return ids[counts >= images + 1]


def draw_trials(labels: np.ndarray, people: int | None, images: int, trials: int, seed: int) -> list[Trial]:
    """`trials` seeded splits: `people` of the eligible people (default: half of them) enrolled with `images`
    random images each; their other images are mated probes, every image of the others a non-mated probe."""
    if images < 1 or trials < 1:
        raise PipelineError(f"--gallery-images and --trials must be at least 1, not {images} and {trials}")
    eligible = eligible_people(labels, images)
    people = len(eligible) // 2 if people is None else people
    if not 1 <= people <= len(eligible):
        raise PipelineError(
            f"--gallery-people {people}: the store has {len(eligible)} people with at least {images + 1} images "
            f"(--gallery-images {images} enrolled, one probe left): choose 1 to {len(eligible)}"
        )
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], eligible)
    counts = np.searchsorted(labels[order], eligible, side="right") - starts
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        chosen = np.sort(rng.choice(len(eligible), size=people, replace=False))
        gallery = np.concatenate([order[starts[p] + rng.choice(counts[p], size=images, replace=False)]
                                  for p in chosen])  # fmt: skip
        enrolled = np.isin(labels, eligible[chosen])
        in_gallery = np.zeros(len(labels), dtype=bool)
        in_gallery[gallery] = True
        out.append(Trial(np.sort(gallery), np.flatnonzero(enrolled & ~in_gallery), np.flatnonzero(~enrolled)))
    return out


def write_split(path: Path, trials: list[Trial]) -> None:
    """`trial,row,role` lines, trial by trial, roles in `ROLES` order, rows increasing."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SPLIT_HEADER)
        for t, trial in enumerate(trials):
            for role in ROLES:
                w.writerows([t, int(r), role] for r in getattr(trial, role))


def read_split(path: Path, labels: np.ndarray) -> list[Trial]:
    """The trials of a `split.csv` (header `trial,row,role`), checked against the store's labels: roles known,
    rows in range and named once per trial, every mated probe's person enrolled and no non-mated probe's."""
    rows: dict[int, dict[str, list[int]]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) != SPLIT_HEADER:
                raise PipelineError(f"--split {path}: the first line must be {','.join(SPLIT_HEADER)}")
            for k, line in enumerate(reader, start=2):
                trial, row, role = _split_line(path, k, line, len(labels))
                rows.setdefault(trial, {r: [] for r in ROLES})[role].append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read --split {path}: {e}") from None
    if not rows:
        raise PipelineError(f"--split {path} names no rows")
    return [_checked_trial(path, t, rows[t], labels) for t in sorted(rows)]


def _split_line(path: Path, k: int, line: list[str], n: int) -> tuple[int, int, str]:
    if len(line) != 3:
        raise PipelineError(f"--split {path} line {k}: expected trial,row,role, got {','.join(line)!r}")
    try:
        trial, row = int(line[0]), int(line[1])
    except ValueError:
        raise PipelineError(f"--split {path} line {k}: trial and row must be integers, got {line[:2]}") from None
    if line[2] not in ROLES:
        raise PipelineError(f"--split {path} line {k}: role {line[2]!r} is not one of {', '.join(ROLES)}")
    if not 0 <= row < n:
        raise PipelineError(f"--split {path} line {k}: row {row} is outside the store's rows 0..{n - 1}")
    return trial, row, line[2]


def _checked_trial(path: Path, t: int, roles: dict[str, list[int]], labels: np.ndarray) -> Trial:
    trial = Trial(*(np.sort(np.array(roles[r], dtype=np.int64)) for r in ROLES))
    named = np.concatenate([trial.gallery, trial.mated, trial.nonmated])
    if len(np.unique(named)) != len(named):
        raise PipelineError(f"--split {path}: trial {t} names a row twice")
    if not len(trial.gallery):
        raise PipelineError(f"--split {path}: trial {t} enrols no image")
    enrolled = np.unique(labels[trial.gallery])
    if not np.isin(labels[trial.mated], enrolled).all():
        raise PipelineError(f"--split {path}: trial {t} has a mated probe whose person has no gallery image")
    if np.isin(labels[trial.nonmated], enrolled).any():
        raise PipelineError(f"--split {path}: trial {t} has a non-mated probe whose person is enrolled")
    return trial
