"""95% intervals of AUC, EER and TAR at FAR.

- Listed pairs (`score --pairs`: LFWPairs, View 2): a percentile bootstrap over the pairs (`ROUNDS` rounds,
  seeded), the usual interval for a fixed list of pairs whose images are mostly distinct.
- All pairs (`score --all-pairs`): pairs that share a person are not independent (a person's image takes part in
  thousands of pairs), so resampling pairs would give intervals far too narrow. The identities are dealt into
  `GROUPS` groups (consecutive runs of labels, `identity_groups`) and the interval is a delete-a-group
  jackknife: the metric recomputed without every pair that touches a group's identities, `se^2 = (G-1)/G sum (theta_g - mean)^2`, interval
  `theta +- 1.96 se`. The engine counts, in the same pass and the same counters as the bins, coarse histograms
  (`COARSE` bins) of all pairs and of the same-person pairs per pair of groups, which is all the jackknife needs
  for AUC and EER. TAR at FAR uses the exact tail, whose pairs carry their group pair.

A level the pairs cannot show (`pipeline.metrics.curve.measurable`: f x different-person pairs < 1) has a null
value and a null interval (`null_unmeasurable`).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.curve import auc_and_bound, equal_error_rate, exact_counts, null_unmeasurable

ROUNDS = 1000
BOOTSTRAP_MAX = 1_000_000  # scores above which the pair bootstrap is left out (1,000 sorts of them)
GROUPS = 10
COARSE = 1024
Z95 = 1.959963984540054


def identity_groups(labels: np.ndarray, groups: int = GROUPS) -> np.ndarray:
    """Each row's group: identities in increasing label order dealt into `groups` runs of equal size, so that rows
    sorted by label have their groups in runs (cheap to count per pair of groups)."""
    uniq, rank = np.unique(labels, return_inverse=True)
    return (rank.reshape(-1) * groups // max(1, len(uniq))).astype(np.int16)


def pair_ids(groups: int = GROUPS) -> np.ndarray:
    """[G, G] table of the id of each unordered pair of groups (symmetric), ids 0..G(G+1)/2-1."""
    t = np.zeros((groups, groups), dtype=np.int16)
    k = 0
    for a in range(groups):
        for b in range(a, groups):
            t[a, b] = t[b, a] = k
            k += 1
    return t


def jackknife(full: float | None, replicates: list[float]) -> list[float] | None:
    """`full +- 1.96 se` of the replicates (clipped to [0, 1]); None for a value that is null (not measurable)."""
    if full is None:
        return None
    r = np.array([x for x in replicates if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(r) < 2 or not math.isfinite(full):
        return None
    g = len(r)
    se = math.sqrt((g - 1) / g * float(((r - r.mean()) ** 2).sum()))
    return [max(0.0, full - Z95 * se), min(1.0, full + Z95 * se)]  # rates: the interval stays in [0, 1]


def percentile(samples: list[float]) -> list[float] | None:
    s = np.array([x for x in samples if x is not None and math.isfinite(x)], dtype=np.float64)
    return None if len(s) < 2 else [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def resampled_metrics(values: np.ndarray, positive: np.ndarray, metric: str,
                      far_levels) -> tuple[float, float, dict[str, float]] | None:  # fmt: skip
    """(AUC, EER, TAR at each FAR level) of a resample of scores; None when it lacks pairs of one kind."""
    pos, neg, _ = exact_counts(values, positive, metric)
    p, q = pos.sum(), neg.sum()
    if p == 0 or q == 0:
        return None
    tp_before = np.cumsum(pos) - pos
    auc = float(np.dot(neg, tp_before + 0.5 * pos) / (p * q))
    tpr, fpr = np.r_[0.0, np.cumsum(pos) / p], np.r_[0.0, np.cumsum(neg) / q]
    return auc, equal_error_rate(fpr, tpr), {f"{f:g}": float(tpr[fpr <= f].max()) for f in far_levels}


def bootstrap_listed(values: np.ndarray, positive: np.ndarray, metric: str, far_levels, seed: int = 0,
                     rounds: int = ROUNDS) -> dict:  # fmt: skip
    """Percentile bootstrap over the listed pairs: `auc_ci95`, `eer_ci95`, `tar_at_far_ci95`."""
    rng = np.random.default_rng(seed)
    n = len(values)
    aucs, eers, tars = [], [], {f"{f:g}": [] for f in far_levels}
    for _ in range(rounds):
        i = rng.integers(0, n, size=n)
        r = resampled_metrics(values[i], positive[i], metric, far_levels)
        if r is None:
            continue
        aucs.append(r[0])
        eers.append(r[1])
        for k, v in r[2].items():
            tars[k].append(v)
    return {
        "auc_ci95": percentile(aucs),
        "eer_ci95": percentile(eers),
        "tar_at_far_ci95": null_unmeasurable(
            {k: percentile(v) for k, v in tars.items()}, n - int(np.count_nonzero(positive))
        ),
        "ci_method": f"percentile bootstrap over the listed pairs, {rounds} rounds, seed {seed}",
    }


def group_replicates(acc, metrics: dict,
                     coarse_tar: bool = False) -> tuple[list[int], list[float], list[float], dict[str, list]]:  # fmt: skip
    """The jackknife's replicates of an all-pairs result (`HistogramROC` with group counts): (groups, AUCs, EERs,
    TARs per FAR level) without every pair that touches each group, for the groups that leave pairs of both kinds
    (fewer identities than groups: the empty groups are no replicates). AUC and EER from the coarse counts, TAR at
    FAR from the exact tail (None where a replicate's tail does not reach the level; no TARs without a tail); with
    `coarse_tar`, the levels beyond the tail from the coarse counts (`coarse_tar_at`)."""
    all_c, pos_c = (c.reshape(GROUPS * GROUPS, COARSE).astype(np.float64) for c in acc.groups[:2])  # exact
    group_rows = np.asarray(acc.groups[2], dtype=np.int64)
    a, b = np.divmod(np.arange(GROUPS * GROUPS), GROUPS)
    keeps = np.array([(a != g) & (b != g) for g in range(GROUPS)])  # [G, pairs of groups]
    pos_g, neg_g = keeps @ pos_c, keeps @ (all_c - pos_c)  # [G, COARSE]: the pairs not touching group g
    m = acc.binning.metric
    pos_g, neg_g = m.most_similar_first(pos_g), m.most_similar_first(neg_g)
    tail = acc.tail
    complete = tail is not None and len(tail.neg) >= metrics["n_negative"]
    groups, aucs, eers, tars = [], [], [], {k: [] for k in metrics["tar_at_far"]} if tail is not None else {}
    for g in np.flatnonzero(group_rows):
        pos, neg = pos_g[g], neg_g[g]
        p, q = int(round(pos.sum())), int(round(neg.sum()))  # exact counts of the pairs without group g
        if p == 0 or q == 0:
            continue
        groups.append(int(g))
        aucs.append(auc_and_bound(pos, neg)[0])
        eers.append(equal_error_rate(np.r_[0.0, np.cumsum(neg) / q], np.r_[0.0, np.cumsum(pos) / p]))
        if tail is not None:
            for k, tar in zip(tars, tail.tar_without([float(k) for k in tars], keeps[g], q, p, complete), strict=True):
                tars[k].append(coarse_tar_at(pos, neg, float(k)) if tar is None and coarse_tar else tar)
    return groups, aucs, eers, tars


def coarse_tar_at(pos: np.ndarray, neg: np.ndarray, far: float) -> float:
    """TAR at FAR `far` from counts per bin ordered most similar first, the ROC taken as straight within a bin
    (pairs of a bin spread evenly over it): for levels beyond the exact tail, where the coarse bins hold many
    pairs each."""
    tpr, fpr = np.r_[0.0, np.cumsum(pos)] / pos.sum(), np.r_[0.0, np.cumsum(neg)] / neg.sum()
    k = int(np.searchsorted(fpr, far, side="right")) - 1  # the last point with FPR <= far
    if k + 1 >= len(fpr):
        return float(tpr[k])
    step = fpr[k + 1] - fpr[k]
    return float(tpr[k] + (far - fpr[k]) / step * (tpr[k + 1] - tpr[k]))


def jackknife_all_pairs(acc, metrics: dict) -> dict:
    """Delete-a-group jackknife intervals of an all-pairs result (`HistogramROC` with group counts and a tail):
    AUC and EER from the coarse counts of the pairs that do not touch the group, TAR at FAR from the exact tail
    (a level is left out where a replicate's tail does not reach it)."""
    _, aucs, eers, tars = group_replicates(acc, metrics)
    out = {
        "auc_ci95": jackknife(metrics["auc"], aucs),
        "eer_ci95": jackknife(metrics["eer"], eers),
        "ci_method": f"delete-a-group jackknife over {GROUPS} groups of identities (consecutive label runs), "
        f"{COARSE} coarse bins for AUC and EER, the exact tail for TAR at FAR",
    }
    if acc.tail is not None:
        out["tar_at_far_ci95"] = {
            k: jackknife(metrics["tar_at_far"][k], v) if None not in v else None for k, v in tars.items()
        }
    return out
