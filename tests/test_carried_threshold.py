"""Thresholds carried to new data (`pipeline.metrics.carried`, `score --threshold-from`): Clopper-Pearson against
scipy.stats and the binomial sum, the threshold against scikit-learn's ROC points, the carried FAR and FRR against
brute force on small stores (listed and all pairs, ties at the threshold, the bins beyond the tail, the
jackknife's replicates), and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.distance import pdist
from scipy.stats import beta
from sklearn.metrics import roc_curve

from cli import main
from pipeline.metrics.carried import (
    accepted,
    clopper_pearson_upper,
    jackknife_upper,
    threshold_at_far,
)
from pipeline.metrics.intervals import identity_groups
from pipeline.metrics.roc import HistogramROC
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.stage import score
from tests.stores import random_store, write_store
from tests.test_score_offsets import add_offsets


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["score", *(str(a) for a in args)])
    return r.exit_code, r.output


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), term by term."""
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def brute_upper(k: int, n: int, level: float = 0.95) -> float:
    """The p where P(X <= k) falls to 1 - level, by bisection on the binomial sum."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) > 1 - level else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 10), (3, 10), (9, 10), (10, 10), (0, 500), (7, 1000),
                                      (1234, 6_848_158), (24_000, 24_620)])  # fmt: skip
def test_clopper_pearson_matches_scipy(k, n):
    expected = 1.0 if k == n else beta.ppf(0.95, k + 1, n - k)
    assert clopper_pearson_upper(k, n) == pytest.approx(expected, rel=1e-10)
    assert clopper_pearson_upper(k, n, 0.99) >= clopper_pearson_upper(k, n)


@pytest.mark.parametrize(("k", "n"), [(0, 7), (1, 33), (5, 149), (60, 149), (148, 149)])
def test_clopper_pearson_matches_brute_force(k, n):
    ours = clopper_pearson_upper(k, n)
    assert ours == pytest.approx(brute_upper(k, n), abs=1e-9)
    assert binomial_cdf(k, n, ours) == pytest.approx(0.05, abs=1e-9)
    if k == 0:
        assert ours == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-12)
    with pytest.raises(ValueError):
        clopper_pearson_upper(n + 1, n)


def test_jackknife_upper_is_one_sided_and_capped():
    reps = [0.1, 0.12, 0.08, 0.11, 0.09]
    g, r = len(reps), np.array(reps)
    se = math.sqrt((g - 1) / g * ((r - r.mean()) ** 2).sum())
    assert jackknife_upper(0.1, reps) == pytest.approx(0.1 + 1.6448536269514722 * se, rel=1e-12)
    assert jackknife_upper(0.99, [0.5, 1.0, 0.9]) == 1.0
    assert jackknife_upper(0.1, [0.1]) is None


def test_threshold_is_scikit_learns_operating_point():
    rng = np.random.default_rng(0)
    pos, neg = np.round(rng.normal(0.6, 0.15, 149), 2), np.round(rng.normal(0.2, 0.15, 1033), 2)  # ties
    s, y = np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    desc = np.sort(neg)[::-1]
    for far in (1 / 1033, 0.004, 0.01, 0.05, 0.2, 0.5):
        t = threshold_at_far(desc, pos, far, len(neg))
        i = np.flatnonzero(fpr <= far)[-1]  # the largest TAR within the level: its least similar threshold
        assert i > 0 and t == thr[i]
        assert accepted(neg, t) / len(neg) == fpr[i] and accepted(pos, t) / len(pos) == tpr[i]
    top = np.r_[0.9, 0.9, 0.9, 0.5]  # the (m+1)-th most similar tied with the first: nothing is accepted
    t = threshold_at_far(top, np.r_[0.9, 0.3], 0.25, 4)
    assert t > 0.9 and accepted(top, t) == 0
    with pytest.raises(ValueError, match="not measurable"):
        threshold_at_far(desc, pos, 1e-4, len(neg))
    with pytest.raises(ValueError, match="do not reach"):
        threshold_at_far(desc[:10], pos, 0.05, len(neg))


def all_scores(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minus the float64 distance, same-person flag and the two rows of every pair i < j."""
    iu = np.triu_indices(len(x), 1)
    return -pdist(x.astype(np.float64)), labels[iu[0]] == labels[iu[1]], np.stack(iu, 1)


def test_all_pairs_against_brute_force_with_jackknife(tmp_path):
    src_store, _, _ = random_store(tmp_path / "a.h5", n=300, d=16, n_ids=60, seed=1)
    path, x, labels = random_store(tmp_path / "b.h5", n=250, d=16, n_ids=50, seed=2)
    src = tmp_path / "a"
    score(ScoreConfig(store=src_store, out=src, progress=False))
    m = score(ScoreConfig(store=path, threshold_from=src, at_far=1e-3, progress=False))
    c = m["carried_threshold"]
    s, same, rows = all_scores(x, labels)
    t, tol = c["threshold"], 1e-6  # the engine's float32 values against float64: no score that close to t
    assert not np.any(np.abs(s - t) < tol)
    fa, ta = int((s[~same] >= t).sum()), int((s[same] >= t).sum())
    assert (c["false_accepts"], c["n_negative"], c["n_positive"]) == (fa, int((~same).sum()), int(same.sum()))
    assert c["far"] == fa / (~same).sum() and c["frr"] == 1 - ta / same.sum() and c["exact"]
    assert c["far_upper95_clopper_pearson"] == pytest.approx(beta.ppf(0.95, fa + 1, (~same).sum() - fa), rel=1e-10)
    groups = identity_groups(labels)  # the delete-a-group jackknife by hand
    gr = groups[rows]
    far_g, frr_g = [], []
    for g in np.unique(groups):
        keep = (gr != g).all(1)
        far_g.append(((s >= t) & keep & ~same).sum() / (keep & ~same).sum())
        frr_g.append(1 - ((s >= t) & keep & same).sum() / (keep & same).sum())
    assert c["far_upper95_jackknife"] == pytest.approx(jackknife_upper(c["far"], far_g), rel=1e-12)
    assert c["frr_upper95_jackknife"] == pytest.approx(jackknife_upper(c["frr"], frr_g), rel=1e-12)
    assert c["far_upper95"] == max(c["far_upper95_clopper_pearson"], c["far_upper95_jackknife"])
    assert c["claim_holds"] == (c["far_upper95"] <= 1e-3)
    own = HistogramROC.load(src / "histogram.npz")
    assert c["source_far"] <= 1e-3 and c["source_n_negative"] == own.n_negative


def test_all_pairs_carried_onto_itself_with_ties(tmp_path):
    """Duplicate rows under other labels: the most similar different-person pairs tie exactly (distance 0), and
    under the same label so do same-person pairs; carried onto its own set the threshold gives exactly the
    source's FAR and its exact-tail TAR at every level, ties at the threshold included."""
    rng = np.random.default_rng(5)
    _, x, labels = random_store(tmp_path / "r.h5", n=280, d=12, n_ids=50, seed=5)
    src_rows, dst = rng.integers(0, 280, 40), rng.choice(280, 40, replace=False)
    x[dst] = x[src_rows]
    labels[dst[:25]] = labels[src_rows[:25]] + 1000 * (np.arange(25) % 2)  # some other people, some the same
    path = write_store(tmp_path / "s.h5", x, labels)
    src = tmp_path / "src"
    m0 = score(ScoreConfig(store=path, out=src, progress=False))
    acc = HistogramROC.load(src / "histogram.npz")
    zero = int((acc.tail.neg == acc.tail.neg[0]).sum())
    assert zero > 5  # tied negatives at the top
    n = m0["n_negative"]
    for far in (1 / n, 3 / n, (zero - 1) / n, zero / n, (zero + 2) / n, 1e-3, 2e-3):
        c = score(ScoreConfig(store=path, threshold_from=src, at_far=far, progress=False))["carried_threshold"]
        assert c["far"] == c["source_far"] <= far + 1e-12
        assert 1 - c["frr"] == pytest.approx(acc.tail.tar_at(far, n, m0["n_positive"]), abs=1e-15)
        assert c["exact"]


def test_bins_beyond_the_tail_bound_both_ways(tmp_path):
    src_store, _, _ = random_store(tmp_path / "a.h5", n=300, d=16, n_ids=60, seed=1)
    src = tmp_path / "a"
    score(ScoreConfig(store=src_store, out=src, progress=False))
    _, x, labels = random_store(tmp_path / "b.h5", n=250, d=16, n_ids=50, seed=2)
    path = write_store(tmp_path / "near.h5", (0.7 * x).astype(np.float32), labels)  # closer: many accepted
    s, same, _ = all_scores(0.7 * x.astype(np.float64), labels)
    c = score(ScoreConfig(store=path, threshold_from=src, at_far=1e-3, progress=False))["carried_threshold"]
    far = (s[~same] >= c["threshold"]).mean()
    assert c["far"] == far and c["counted_from"]["far"] == "bins" and far > 0.01  # no pair in the threshold's bin
    c = score(ScoreConfig(store=path, threshold_from=src, at_far=1e-3, bins=256, progress=False))["carried_threshold"]
    frr = (s[same] < c["threshold"]).mean()
    assert c["far"] is None and not c["exact"]  # 256 bins: pairs on both sides in the threshold's bin
    assert c["far_bounds"][0] <= far <= c["far_bounds"][1] and c["far_bounds"][1] - c["far_bounds"][0] < 0.01
    lo, hi = c.get("frr_bounds", [c["frr"], c["frr"]])
    assert lo <= frr <= hi
    n = int((~same).sum())
    assert c["far_upper95"] == pytest.approx(beta.ppf(0.95, round(c["far_bounds"][1] * n) + 1,
                                                      n - round(c["far_bounds"][1] * n)), rel=1e-9)  # fmt: skip
    assert c["far_upper95_jackknife"] is None and not c["claim_holds"]


def listed(tmp_path: Path, name: str, x: np.ndarray, labels: np.ndarray, pairs: np.ndarray, same=None) -> Path:
    same = (labels[pairs[:, 0]] == labels[pairs[:, 1]]) if same is None else same
    return write_store(tmp_path / name, x, labels, pairs, same.astype(np.int8), protocol="pairs")


def without_pair_scores(folder: Path) -> None:
    """histogram.npz as a version that kept no per-pair scores wrote it."""
    with np.load(folder / "histogram.npz") as z:
        kept = {k: z[k] for k in z.files if not k.startswith("pair_")}
    np.savez_compressed(folder / "histogram.npz", **kept)


def test_listed_pairs_against_brute_force_with_ties(tmp_path):
    rng = np.random.default_rng(3)
    _, x, labels = random_store(tmp_path / "r.h5", n=120, d=8, n_ids=30, seed=4)
    i, j = rng.integers(0, 120, 700), rng.integers(0, 120, 700)
    pairs = np.stack([i[i != j], j[i != j]], 1)
    src_store = listed(tmp_path, "a.h5", x, labels, pairs)
    src = tmp_path / "a"
    score(ScoreConfig(store=src_store, out=src, all_pairs=False, progress=False))
    # scored: the source's pairs again, half of them twice more with the other label: ties at every score
    more = pairs[::2]
    flags = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    both = np.r_[pairs, more, more]
    same = np.r_[flags, ~flags[::2], flags[::2]]
    path = listed(tmp_path, "b.h5", x, labels, both, same)
    xd, ties = x.astype(np.float64), []
    for far in (0.01, 0.05, 0.1):
        c = score(ScoreConfig(store=path, all_pairs=False, threshold_from=src, at_far=far,
                              progress=False))["carried_threshold"]  # fmt: skip
        s = -np.sqrt(((xd[both[:, 0]] - xd[both[:, 1]]) ** 2).sum(1))  # as the listed pairs score them
        t = c["threshold"]
        assert t in s[: len(pairs)] and (s == t).sum() >= 1
        src_s = s[: len(pairs)]
        assert c["source_far"] == (src_s[~flags] >= t).mean() <= far
        fa, fr = int((s[~same] >= t).sum()), int((s[same] < t).sum())
        assert (c["far"], c["frr"]) == (fa / (~same).sum(), fr / same.sum())
        assert (c["false_accepts"], c["false_rejects"]) == (fa, fr)
        assert c["far_upper95"] == pytest.approx(beta.ppf(0.95, fa + 1, (~same).sum() - fa), rel=1e-10)
        assert c["far_upper95_jackknife"] is None and c["claim_holds"] == (c["far_upper95"] <= far)
        ties.append(int((s == t).sum()))
    assert max(ties) > 1  # pairs tied with the threshold in the scored set
    kept = score(ScoreConfig(store=path, all_pairs=False, threshold_from=src, at_far=0.05, progress=False))
    without_pair_scores(src)  # an older folder: its store rescored, the same threshold
    again = score(ScoreConfig(store=path, all_pairs=False, threshold_from=src, at_far=0.05, progress=False))
    assert again["carried_threshold"] == kept["carried_threshold"]


def test_refusals(tmp_path):
    a, x, labels = random_store(tmp_path / "a.h5", n=150, d=8, n_ids=30, seed=1)
    b, _, _ = random_store(tmp_path / "b.h5", n=120, d=8, n_ids=30, seed=2)
    src = tmp_path / "src"
    assert cli(a, "--all-pairs", "--out", src, "--no-progress")[0] == 0

    def refused(*args, match: str) -> None:
        out = tmp_path / "out"
        code, text = cli(b, "--all-pairs", "--out", out, "--no-progress", *args)
        lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and match in lines[0], text
        assert not out.exists()

    refused("--threshold-from", tmp_path / "missing", "--at-far", "1e-3", match="histogram.npz")
    refused("--threshold-from", src, match="go together")
    refused("--at-far", "1e-3", match="go together")
    refused("--threshold-from", src, "--at-far", "1.5", match="between 0 and 1")
    refused("--threshold-from", src, "--at-far", "1e-3", "--metric", "cosine", match="same --metric")
    refused("--threshold-from", src, "--at-far", "1e-6", match="not measurable")
    refused("--threshold-from", src, "--at-far", "0.05", match="exact tail holds the")
    with pytest.raises(ValueError, match="threshold-from"):
        ScoreConfig(store=b, rows=(0, 10), threshold_from=src, at_far=1e-3)
    # listed pairs: a level below 1/N; their store gone
    rng = np.random.default_rng(0)
    pairs = np.stack([rng.integers(0, 75, 200), rng.integers(75, 150, 200)], 1)
    lsrc = tmp_path / "listed"
    score(ScoreConfig(store=listed(tmp_path, "l.h5", x, labels, pairs), out=lsrc, all_pairs=False, progress=False))
    refused("--threshold-from", lsrc, "--at-far", "1e-3", match="not measurable")
    without_pair_scores(lsrc)
    (tmp_path / "l.h5").unlink()
    refused("--threshold-from", lsrc, "--at-far", "0.05", match="is not there")
    # score offsets on one side only
    csrc = tmp_path / "cos"
    o = np.random.default_rng(1).uniform(0, 0.2, 150).astype(np.float32)
    assert cli(add_offsets(a, o), "--all-pairs", "--metric", "cosine", "--out", csrc, "--no-progress")[0] == 0
    refused("--threshold-from", csrc, "--at-far", "1e-3", "--metric", "cosine", match="score offsets")
