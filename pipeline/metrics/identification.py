"""Open-set identification figures (NIST FRTE 1:N, NISTIR 8271) from each search's outcome, stateless: CMC, FNIR
at FPIR, DIR at FAR, the IET curve and their bootstrap intervals. Scores are similarities here (higher: more
similar; l2 distances enter negated). Definitions and formulas: docs/identification.md."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

FPIR_LEVELS = ("0.001", "0.01", "0.1")
"""FPIR levels of `fnir_at_fpir` (keys as metrics.json writes them)."""
DIR_LEVELS = ("0.01",)
"""FAR levels of `dir_at_far` (BLUFR's)."""
CURVE_LEVEL = "0.01"
"""The FPIR of the distractor curve."""
IET_GRID = np.logspace(-4, 0, 41)
"""FPIR values of the averaged IET curve."""
BOOTSTRAP = 1000
CI_METHOD = ("two-level percentile bootstrap, 1000 replicates: trials with replacement, then within each trial the "
             "probes' people with replacement (mated and non-mated people apart); thresholds recomputed")  # fmt: skip


@dataclass
class Searches:
    """One trial's searches. A mated search: its mate's score and rank (1 + the non-mates at or above it; R + 1
    when beyond the top R); a non-mated search: its best candidate's score. `*_people`: each search's person
    (the bootstrap's clusters)."""

    mate: np.ndarray
    rank: np.ndarray
    mated_people: np.ndarray
    top: np.ndarray
    nonmated_people: np.ndarray


def cmc(rank: np.ndarray, max_rank: int) -> np.ndarray:
    """Identification rate at ranks 1..max_rank: the fraction of mated searches whose mate ranks at most k."""
    if len(rank) == 0:
        return np.full(max_rank, np.nan)
    counts = np.bincount(np.minimum(rank, max_rank + 1), minlength=max_rank + 2)[1 : max_rank + 1]
    return np.cumsum(counts) / len(rank)


def accepted_above(top: np.ndarray, level: str | Fraction) -> float:
    """The threshold t_(k+1) at FPIR `level`: with the non-mated searches' best scores sorted t_1 >= ... >= t_n and
    k = floor(level n) (exact), a search is accepted when its score is strictly above it; -inf (every search)
    when k >= n."""
    n = len(top)
    f = Fraction(level)
    k = (f.numerator * n) // f.denominator
    if k >= n:
        return -np.inf
    return float(-np.partition(-np.asarray(top, dtype=np.float64), k)[k])


def fnir(mate: np.ndarray, rank: np.ndarray, threshold: float) -> float:
    """FNIR(1, T): the fraction of mated searches whose mate is not at rank 1 with a score above T."""
    if len(mate) == 0:
        return float("nan")
    return float(1.0 - np.mean((rank == 1) & (mate > threshold)))


def trial_figures(s: Searches, max_rank: int) -> dict:
    """CMC, FNIR at FPIR, DIR at FAR, their thresholds and the IET curve of one trial."""
    thresholds = {f: accepted_above(s.top, f) for f in sorted({*FPIR_LEVELS, *DIR_LEVELS})}
    out = {
        "cmc": cmc(s.rank, max_rank).tolist(),
        "fnir_at_fpir": {f: fnir(s.mate, s.rank, thresholds[f]) for f in FPIR_LEVELS},
        "dir_at_far": {f: 1.0 - fnir(s.mate, s.rank, thresholds[f]) for f in DIR_LEVELS},
        "fpir_thresholds": thresholds,
        "n_mated": len(s.mate),
        "n_nonmated": len(s.top),
    }
    out["iet_fnir"] = [fnir(s.mate, s.rank, accepted_above(s.top, Fraction(float(f)))) for f in IET_GRID]
    return out


def averaged(per_trial: list[dict]) -> dict:
    """The trials' figures averaged (lists element by element, dicts key by key)."""

    def mean(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: mean([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return np.mean(np.array(values, dtype=np.float64), axis=0).tolist()
        return float(np.mean(values))

    keys = ("cmc", "fnir_at_fpir", "dir_at_far")
    out = {k: mean([t[k] for t in per_trial]) for k in keys}
    out["iet"] = {"fpir": IET_GRID.tolist(), "fnir": mean([t["iet_fnir"] for t in per_trial])}
    return out


def rank1_and_fnir(mate: np.ndarray, best_nonmate: np.ndarray, top: np.ndarray, level: str) -> tuple[float, float]:
    """Rank 1 and FNIR at FPIR `level` from each mated search's best non-mate score (a tie ranks the mate second)
    and each non-mated search's best score: the distractor curve's point."""
    rank = np.where(mate > best_nonmate, 1, 2)
    rate = float(np.mean(rank == 1)) if len(rank) else float("nan")
    return rate, fnir(mate, rank, accepted_above(top, level))


# ---------------------------------------------------------------------------------------------------- intervals


def _cluster_weights(people: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, searches] weights: each replicate draws the searches' people with replacement (a search's weight
    is the number of times its person was drawn)."""
    ids, inverse = np.unique(people, return_inverse=True)
    if len(ids) == 0:
        return np.zeros((reps, 0))
    drawn = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=reps)
    return drawn[:, inverse].astype(np.float64)


def _weighted_thresholds(top: np.ndarray, w: np.ndarray, level: str) -> np.ndarray:
    """Per replicate, `accepted_above` with each non-mated search counted w times."""
    f = Fraction(level)
    order = np.argsort(-top, kind="stable")
    t, cw = top[order], np.cumsum(w[:, order], axis=1)
    total = cw[:, -1] if cw.shape[1] else np.zeros(len(w))
    k = (np.rint(total).astype(np.int64) * f.numerator) // f.denominator
    at = (cw < (k + 0.5)[:, None]).sum(1)  # the first position whose cumulative weight reaches k + 1
    return np.where(k >= np.rint(total), -np.inf, t[np.minimum(at, len(t) - 1)] if len(t) else -np.inf)


def _replicates(s: Searches, reps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One trial's figures in `reps` replicates drawn over its probes' people."""
    wm = _cluster_weights(s.mated_people, reps, rng)
    wn = _cluster_weights(s.nonmated_people, reps, rng)
    hit1 = (s.rank == 1).astype(np.float64)
    total = wm.sum(1)
    out = {"rank1": (wm @ hit1) / total}
    for f in sorted({*FPIR_LEVELS, *DIR_LEVELS}):
        thr = _weighted_thresholds(np.asarray(s.top, dtype=np.float64), wn, f)
        hits = (wm * ((s.rank == 1)[None, :] & (s.mate[None, :] > thr[:, None]))).sum(1)
        out[f] = 1.0 - hits / total
    return out


def bootstrap_intervals(trials: list[Searches], seed: int = 0, reps: int = BOOTSTRAP) -> dict:
    """95% percentile intervals of rank 1, FNIR at FPIR and DIR at FAR over trials and probes' people."""
    rng = np.random.default_rng(seed)
    per = [_replicates(s, reps, rng) for s in trials]
    n = len(trials)
    pick = rng.integers(n, size=(reps, n))
    inner = (np.arange(reps)[:, None] + 7919 * np.arange(n)[None, :]) % reps  # another inner draw per slot

    def interval(key: str, flip: bool = False) -> list[float]:
        values = np.stack([p[key] for p in per], axis=1)  # [reps, trials]
        v = np.nanmean(values[inner, pick], axis=1)
        v = 1.0 - v if flip else v
        return np.nanpercentile(v, [2.5, 97.5]).tolist() if np.isfinite(v).any() else [np.nan, np.nan]

    return {
        "cmc_ci95": interval("rank1"),
        "fnir_at_fpir_ci95": {f: interval(f) for f in FPIR_LEVELS},
        "dir_at_far_ci95": {f: interval(f, flip=True) for f in DIR_LEVELS},
        "ci_method": CI_METHOD,
    }
