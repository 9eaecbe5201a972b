"""From a whole search's state (`pipeline.identify.state.SearchState`) to the figures of each trial, averaged
over the trials (`pipeline.metrics.identification`), the distractor curve and every search's outcome
(searches.csv)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.identify.protocol import Trial
from pipeline.identify.state import SearchState
from pipeline.metrics.identification import (
    CURVE_LEVEL,
    Searches,
    averaged,
    bootstrap_intervals,
    rank1_and_fnir,
    trial_figures,
)
from pipeline.scoring.search import top_columns

SEARCHES_HEADER = ["trial", "row", "role", "mate_score", "mate_rank", "top_nonmate_score"]


def distractor_cuts(n: int) -> list[int]:
    """Ends of the distractor curve's segments: 10^3, 10^4, ... below n, then n (none without distractors)."""
    cuts, c = [], 1000
    while c < n:
        cuts.append(c)
        c *= 10
    return cuts + [n] if n else []


@dataclass
class TrialOutcome:
    """One trial's searches and what searches.csv and the distractor curve add: the store rows of the mated
    and non-mated searches, the mated searches' best non-mate score, and the curve's points."""

    searches: Searches
    mated_rows: np.ndarray
    nonmated_rows: np.ndarray
    best_nonmate: np.ndarray
    curve: list[tuple[float, float]]


def trial_outcome(state: SearchState, t: int, trial: Trial, probe_rows: np.ndarray, labels: np.ndarray) -> TrialOutcome:
    """Each search of trial `t`: mate score and rank (ties rank the mate behind), the best non-mated scores, and
    rank 1 and FNIR at FPIR 0.01 against the first n distractors."""
    r = state.r
    pm, pn = np.searchsorted(probe_rows, trial.mated), np.searchsorted(probe_rows, trial.nonmated)
    mate = state.mate[t, pm].astype(np.float64)
    if not np.isfinite(mate).all():
        raise RuntimeError(f"internal error: trial {t} has mated searches without a mate score")
    near = top_columns(np.concatenate([state.nonmate[t, pm], state.distractors[pm]], axis=1), r)
    count = (near >= mate[:, None].astype(np.float32)).sum(axis=1)
    rank = np.where(count < r, count + 1, r + 1)
    enrolled_m, enrolled_n = state.nonmate[t, pm, 0], state.nonmate[t, pn, 0]
    top = np.maximum(enrolled_n, state.distractors[pn, 0]).astype(np.float64)
    searches = Searches(mate, rank, labels[trial.mated], top, labels[trial.nonmated])
    prefix = np.maximum.accumulate(state.segments, axis=1)
    curve = [rank1_and_fnir(mate, np.maximum(enrolled_m, prefix[pm, c]), np.maximum(enrolled_n, prefix[pn, c]),
                            CURVE_LEVEL) for c in range(prefix.shape[1])]  # fmt: skip
    return TrialOutcome(searches, trial.mated, trial.nonmated, near[:, 0].astype(np.float64), curve)


def outcomes(state: SearchState, trials: list[Trial], probe_rows: np.ndarray, labels: np.ndarray) -> list[TrialOutcome]:
    """Every trial's outcome."""
    return [trial_outcome(state, t, trial, probe_rows, labels) for t, trial in enumerate(trials)]


def identification_metrics(outcomes: list[TrialOutcome], max_rank: int, cuts: list[int], seed: int,
                           sign: float) -> dict:  # fmt: skip
    """metrics.json's figures: averaged over trials, per trial (`trials`), intervals, the distractor curve.
    `sign`: -1 turns similarities back into l2's squared distances (thresholds)."""
    per_trial = []
    for o in outcomes:
        fig = trial_figures(o.searches, max_rank)
        fig["fpir_thresholds"] = {f: sign * v for f, v in fig["fpir_thresholds"].items()}
        if cuts:
            fig["distractor_curve"] = _curve(cuts, [o.curve])
        per_trial.append(fig)
    out = averaged(per_trial)
    out.update(bootstrap_intervals([o.searches for o in outcomes], seed))
    out["n_mated"] = float(np.mean([o.searches.mate.size for o in outcomes]))
    out["n_nonmated"] = float(np.mean([o.searches.top.size for o in outcomes]))
    if cuts:
        out["distractor_curve"] = _curve(cuts, [o.curve for o in outcomes])
    for fig in per_trial:
        fig.pop("iet_fnir")
    out["trials"] = per_trial
    return out


def _curve(cuts: list[int], curves: list[list[tuple[float, float]]]) -> list[dict]:
    """The distractor curve's points averaged over trials."""
    mean = np.mean(np.array(curves, dtype=np.float64), axis=0)
    return [{"distractors": n, "rank1": float(p[0]), "fnir_at_fpir_0.01": float(p[1])}
            for n, p in zip(cuts, mean, strict=True)]  # fmt: skip


def write_searches(path: Path, outcomes: list[TrialOutcome], sign: float) -> None:
    """searches.csv: one line per search (scores in the metric's units; mate_rank R+1: beyond the top R)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SEARCHES_HEADER)
        for t, o in enumerate(outcomes):
            s = o.searches
            w.writerows([t, int(row), "mated", f"{sign * m:.9g}", int(k), f"{sign * b:.9g}"]
                        for row, m, k, b in zip(o.mated_rows, s.mate, s.rank, o.best_nonmate, strict=True))  # fmt: skip
            w.writerows([t, int(row), "nonmated", "", "", f"{sign * b:.9g}"]
                        for row, b in zip(o.nonmated_rows, s.top, strict=True))  # fmt: skip
