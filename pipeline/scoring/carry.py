"""`score --threshold-from DIR --at-far F`: the threshold that gives FAR F on another results folder's pairs,
carried to the scored set: the false accept and false reject rates it gives here, their one-sided 95% upper
bounds and whether the claimed rate holds, into metrics.json's `carried_threshold` (the statistics:
`pipeline.metrics.carried`).

Exact scores come from: an all-pairs result's exact tail (its most similar different-person pairs and every
same-person pair at least as similar, as the engine binned them); a listed-pairs result's `pair_scores` (or, in
a folder written before they were kept, its store rescored and checked against its histograms). Here, listed
pairs are counted from their scores, all pairs exactly from the tail when the threshold lies within it, from the
bins otherwise (the threshold's bin bounded both ways: `far_bounds`, `frr_bounds`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import carried as stats
from pipeline.metrics.intervals import COARSE, GROUPS
from pipeline.metrics.roc import HistogramROC
from pipeline.scoring.calibrate import check_source, read_source
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.listed import listed_pairs
from pipeline.store.layout import open_store

log = logging.getLogger(__name__)

FLAG = "--threshold-from"


@dataclass(frozen=True)
class Source:
    """The threshold read off a source results folder and what it gives there."""

    folder: Path
    threshold: float
    """In the score's own units (cosine after score offsets, or minus the Euclidean distance)."""
    target_far: float
    far: float
    """Counted exactly on the source's pairs at `threshold`."""
    frr: float
    n_negative: int
    n_positive: int
    roc: HistogramROC
    metrics: dict
    """The source's metrics.json (the checks against the scored set)."""


def read_threshold(folder: Path | str, far: float, metric: str) -> Source:
    """The threshold giving FAR `far` on the results folder `folder`; PipelineError (exit 2) for a source that
    cannot give it exactly: another metric or system, a level below 1/N, an all-pairs result whose tail does not
    reach it or that has none, listed pairs whose store is gone or no longer gives their scores."""
    folder = Path(folder)
    roc, m = read_source(folder, FLAG)
    if m.get("mode") == "scores":
        raise PipelineError(f"{FLAG} {folder}: it holds another system's scores (score --scores)")
    if roc.binning.metric != metric:
        raise PipelineError(f"{FLAG} {folder}: its scores are {roc.binning.metric}, these {metric}: give a result "
                            f"of the same --metric")  # fmt: skip
    n_neg, n_pos = roc.n_negative, roc.n_positive
    if stats.allowed_false_accepts(far, n_neg) < 1:
        raise PipelineError(f"{FLAG} {folder}: FAR {far:g} is not measurable there: {n_neg:,} different-person "
                            f"pairs show no FAR below 1/N = {1 / max(1, n_neg):.3g}")  # fmt: skip
    if m.get("mode") == "pairs":
        s, same = _listed_scores(folder, roc, m)
        neg, pos = np.sort(s[~same])[::-1], s[same]
    else:
        neg, pos = _tail_scores(folder, roc, far)
    try:
        t = stats.threshold_at_far(neg, pos, far, n_neg)
    except ValueError as e:
        raise PipelineError(f"{FLAG} {folder}: {e}") from None
    frr = 1.0 - stats.accepted(pos, t) / n_pos if n_pos else float("nan")
    return Source(folder, t, far, stats.accepted(neg, t) / n_neg, frr, n_neg, n_pos, roc, m)


def _tail_scores(folder: Path, roc: HistogramROC, far: float) -> tuple[np.ndarray, np.ndarray]:
    """An all-pairs source's exact tail as scores (negatives most similar first)."""
    tail = roc.tail
    if tail is None:
        raise PipelineError(f"{FLAG} {folder}: no exact tail in its histogram.npz (an older version wrote it): "
                            f"score it again")  # fmt: skip
    if stats.allowed_false_accepts(far, roc.n_negative) >= len(tail.neg) and len(tail.neg) < roc.n_negative:
        need = stats.allowed_false_accepts(far, roc.n_negative) + 1
        raise PipelineError(f"{FLAG} {folder}: its exact tail holds the {len(tail.neg):,} most similar of its "
                            f"{roc.n_negative:,} different-person scores, FAR {far:g} needs the {need:,} most similar: "
                            f"the threshold there is known only to a bin")  # fmt: skip
    return stats.coordinates_to_scores(tail.neg, roc.binning), stats.coordinates_to_scores(tail.pos, roc.binning)


def listed_scores(acc: HistogramROC) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores, same-person flags) of listed pairs from their histograms' `pair_scores`; None without them."""
    if "pair_scores" not in acc.arrays:
        return None
    return np.asarray(acc.arrays["pair_scores"], dtype=np.float64), np.asarray(acc.arrays["pair_labels"]) != 0


def _listed_scores(folder: Path, roc: HistogramROC, m: dict) -> tuple[np.ndarray, np.ndarray]:
    """A listed-pairs source's (scores, same-person flags): its `pair_scores`, or, written before they were kept,
    rescored from the store its metrics.json names (float64, as `score --pairs` scored them) and checked against
    its histograms."""
    kept = listed_scores(roc)
    if kept is not None:
        return kept
    store_path = m.get("store")
    if not store_path or not Path(store_path).is_file():
        raise PipelineError(f"{FLAG} {folder}: listed pairs keep no scores of their own and their store "
                            f"({store_path}) is not there: score them again with it")  # fmt: skip
    with open_store(store_path, need_labels=False) as store:
        score = ScoreDefinition.of(store, m["metric"], (m.get("config") or {}).get("score_norm", True))
        values, positive, _ = listed_pairs(store, score)
    again = HistogramROC(roc.binning)
    again.update(values, positive)
    same = np.array_equal(again.pos, roc.pos) and np.array_equal(again.neg, roc.neg)
    if score.norm != m.get("score_norm") or not same:
        raise PipelineError(f"{FLAG} {folder}: its store {store_path} no longer gives the scores it counted "
                            f"(changed since): score it again")  # fmt: skip
    return stats.to_scores(values, roc.binning.metric), positive


def carry(metrics: dict, acc: HistogramROC, source: Source) -> dict:
    """The source's threshold on the scored pairs (`acc`: listed pairs with their `pair_scores`, or all pairs with
    the tail, group counts and bins): `metrics` gets `carried_threshold` (returned)."""
    check_source(source.folder, source.roc, source.metrics, acc, metrics, FLAG, "a threshold")
    t, n_neg, n_pos = source.threshold, acc.n_negative, acc.n_positive
    listed = listed_scores(acc)
    if listed is not None:
        s, same = listed
        fa, ta = stats.accepted(s[~same], t), stats.accepted(s[same], t)
        counts, jack, counted = ((fa, fa), (ta, ta)), (None, None), ("listed scores",) * 2
    else:
        counts, jack, counted = _all_pairs_counts(acc, t)
    entry = {"threshold": t, "source": str(source.folder.resolve()), "target_far": source.target_far,
             "score": "minus Euclidean distance" if acc.binning.metric.low_is_similar else "cosine",
             **_rates(counts, jack, n_neg, n_pos), "counted_from": dict(zip(("far", "frr"), counted, strict=True)),
             "source_far": source.far, "source_frr": source.frr, "source_n_negative": source.n_negative}  # fmt: skip
    entry["claim_holds"] = entry["far_upper95"] <= source.target_far
    metrics["carried_threshold"] = entry
    log.info("threshold %.6g (FAR %g on %s) gives FAR %s (95%% upper bound %.4g), FRR %s (%.4g) here: the claim %s",
             t, source.target_far, source.folder, _text(entry["far"], entry.get("far_bounds")), entry["far_upper95"],
             _text(entry["frr"], entry.get("frr_bounds")), entry["frr_upper95"],
             "holds" if entry["claim_holds"] else "does not hold")  # fmt: skip
    return entry


def _text(rate: float | None, bounds: list[float] | None) -> str:
    return f"{rate:.4g}" if rate is not None else f"in [{bounds[0]:.4g}, {bounds[1]:.4g}]"


def _all_pairs_counts(acc: HistogramROC, t: float) -> tuple[tuple, tuple, tuple]:
    """((fewest, most) false accepts, (fewest, most) true accepts) of all pairs at `t`, exact from the tail where
    it reaches (then also the jackknife's replicates of FAR and FRR), from the bins otherwise (exact too when the
    threshold's bin holds none of them); and where each count comes from."""
    tail = acc.tail
    neg = stats.coordinates_to_scores(tail.neg, acc.binning)
    pos = stats.coordinates_to_scores(tail.pos, acc.binning)
    last = neg[-1] if len(neg) else np.inf  # negatives beyond the tail are at most this similar; positives below
    far_exact = len(neg) >= acc.n_negative or t > last
    fa = (stats.accepted(neg, t),) * 2 if far_exact else stats.binned_accepted(acc.neg, acc.binning, t)
    ta = (stats.accepted(pos, t),) * 2 if t >= last else stats.binned_accepted(acc.pos, acc.binning, t)
    jack = (None, None)
    if acc.groups is not None and far_exact and t >= last:
        all_c, pos_c = (np.asarray(c, dtype=np.int64).reshape(GROUPS * GROUPS, COARSE).sum(1) for c in acc.groups[:2])
        rows = np.asarray(acc.groups[2])
        jack = (stats.group_rates(tail.neg_ids[neg >= t], all_c - pos_c, rows),
                [1.0 - r for r in stats.group_rates(tail.pos_ids[pos >= t], pos_c, rows)])  # fmt: skip
    return (fa, ta), jack, ("tail" if far_exact else "bins", "tail" if t >= last else "bins")


def _rates(counts: tuple, jack: tuple, n_neg: int, n_pos: int) -> dict:
    """far, frr (None when only bounded, with `far_bounds`, `frr_bounds`) and their upper bounds: Clopper-Pearson
    of the most events the counts allow, and the jackknife's where it has replicates, the larger counting."""
    (fa_lo, fa_hi), (ta_lo, ta_hi) = counts
    out: dict = {"n_negative": n_neg, "n_positive": n_pos}
    rates = (("far", "false_accepts", fa_lo, fa_hi, n_neg, jack[0]),
             ("frr", "false_rejects", n_pos - ta_hi, n_pos - ta_lo, n_pos, jack[1]))  # fmt: skip
    for name, events, lo, hi, n, reps in rates:
        rate = lo / n if lo == hi else None
        cp = stats.clopper_pearson_upper(hi, n)
        jk = None if rate is None or reps is None else stats.jackknife_upper(rate, reps)
        out.update({name: rate, f"{name}_upper95": max(cp, jk or 0.0), f"{name}_upper95_clopper_pearson": cp,
                    f"{name}_upper95_jackknife": jk, events: hi if lo == hi else None})  # fmt: skip
        if rate is None:
            out[f"{name}_bounds"] = [lo / n, hi / n]
    out["exact"] = out["far"] is not None and out["frr"] is not None
    both = f" and the delete-a-group jackknife over {GROUPS} identity groups (rate + z se), the larger counting"
    out["bound_method"] = (
        f"one-sided {stats.LEVEL:.0%} upper bounds: Clopper-Pearson over the pairs"
        + ("" if jack[0] is None else both)
        + ("" if out["exact"] else "; a rate only bounded by the bins is bounded at its most")
    )
    return out
