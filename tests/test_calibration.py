"""Calibration (`pipeline.metrics.calibration`, `score --calibrate-on`): the logistic fit against scikit-learn's
on the same binned scores, Cllr against the per-pair formula and bob.measure, minCllr against a brute-force
pool-adjacent-violators and scikit-learn's isotonic regression, and the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from cli import main
from pipeline.metrics.binning import Binning
from pipeline.metrics.calibration import bin_scores, cllr, logistic_fit, min_cllr, reliability
from pipeline.metrics.roc import HistogramROC
from pipeline.report.figures import recognise_figure
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.stage import score
from tests.stores import random_store, write_store

BOB_POS = np.random.RandomState(0).normal(1.0, 1.0, 149)  # RandomState: the same numbers in every NumPy
BOB_NEG = np.random.RandomState(1).normal(-1.0, 1.2, 331)
BOB_CLLR = {(1.0, 0.0): 0.6064899327269002, (0.8, 0.3): 0.663489164990407}
"""bob.measure 6.1.1's `calibration.cllr(BOB_NEG * a + b, BOB_POS * a + b)`, computed in a venv of its own (it
pins numpy ~=1.26 and pillow ~=10.2, below this project's)."""


def two_classes(n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.55, 0.12, n_pos), rng.normal(0.2, 0.15, n_neg)


def counts(n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """Same-person and different-person counts of `n_pos` scores followed by `n_neg`, one pair each."""
    p = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    return p, 1.0 - p


def binned(pos: np.ndarray, neg: np.ndarray, bins: int, metric: str = "cosine") -> HistogramROC:
    """Cosines (or squared distances) into a histogram over their range."""
    values = np.r_[pos, neg]
    acc = HistogramROC(Binning(float(values.min()), float(values.max()), bins, metric))
    acc.update(values, np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    return acc


def per_pair_cllr(llr_pos: np.ndarray, llr_neg: np.ndarray) -> float:
    """The issue's formula, pair by pair in plain Python."""
    a = sum(math.log2(1 + math.exp(-v)) for v in llr_pos) / len(llr_pos)
    b = sum(math.log2(1 + math.exp(v)) for v in llr_neg) / len(llr_neg)
    return (a + b) / 2


def brute_min_cllr(scores: np.ndarray, same: np.ndarray) -> float:
    """Pool adjacent violators by hand on the pairs in increasing score (equal scores pooled first), the
    empirical prior's log-odds removed, then Cllr pair by pair."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order].astype(float)
    pools = []  # [same, pairs, first index, last index]
    for k in range(len(s)):
        if pools and s[pools[-1][3]] == s[k]:
            pools[-1] = [pools[-1][0] + y[k], pools[-1][1] + 1, pools[-1][2], k]
        else:
            pools.append([y[k], 1, k, k])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] >= pools[-1][0] / pools[-1][1]:
            b = pools.pop()
            pools[-1] = [pools[-1][0] + b[0], pools[-1][1] + b[1], pools[-1][2], b[3]]
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    total = [0.0, 0.0]
    for same_count, n, _, _ in pools:
        rate = same_count / n
        llr = (math.log(rate / (1 - rate)) if 0 < rate < 1 else math.copysign(math.inf, rate - 0.5)) - math.log(
            n_pos / n_neg
        )
        if same_count:
            total[0] += same_count * math.log2(1 + math.exp(-llr))
        if n - same_count:
            total[1] += (n - same_count) * math.log2(1 + math.exp(llr))
    return (total[0] / n_pos + total[1] / n_neg) / 2


@pytest.mark.parametrize(("n_pos", "n_neg", "bins"), [(149, 1033, 257), (33, 5000, 64), (500, 500, 1 << 12)])
def test_fit_matches_sklearn_on_binned_scores(n_pos, n_neg, bins):
    acc = binned(*two_classes(n_pos, n_neg, seed=n_pos), bins)
    s = bin_scores(acc.binning)
    slope, offset = logistic_fit(s, acc.pos, acc.neg)
    keep = acc.pos + acc.neg > 0
    x = np.r_[s[keep], s[keep]][:, None]
    y = np.r_[np.ones(keep.sum()), np.zeros(keep.sum())]
    weight = np.r_[acc.pos[keep] / acc.n_positive, acc.neg[keep] / acc.n_negative] * 0.5 * (n_pos + n_neg)
    ref = LogisticRegression(C=1e12, tol=1e-14, max_iter=100_000).fit(x, y, sample_weight=weight)
    assert slope == pytest.approx(ref.coef_[0, 0], rel=1e-5)
    assert offset == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)
    ours, theirs = cllr(slope * s + offset, acc.pos, acc.neg), cllr(ref.decision_function(s[:, None]), acc.pos, acc.neg)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert ours <= theirs + 1e-12  # Newton's optimum is at least as good as lbfgs's


def test_fit_is_prior_independent_and_invariant_to_units():
    pos, neg = two_classes(200, 3000, seed=3)
    s, (p, n) = np.r_[pos, neg], counts(len(pos), len(neg))
    slope, offset = logistic_fit(s, p, n)
    assert logistic_fit(s, 7 * p, n) == pytest.approx((slope, offset), rel=1e-9)  # the pairs' mix: no matter
    assert logistic_fit(100 * s - 3, p, n) == pytest.approx((slope / 100, offset + 3 * slope / 100), rel=1e-9)
    rng = np.random.default_rng(4)  # a linear llr (2 s for N(+-1, 1)) is found at any prior, its log-odds removed
    pos, neg = rng.normal(1, 1, 20_000), rng.normal(-1, 1, 20_000)
    s, (p, n) = np.r_[pos, neg], counts(len(pos), len(neg))
    for prior in (0.01, 0.5, 0.9):
        assert logistic_fit(s, p, n, prior) == pytest.approx((2, 0), abs=0.06)


def test_cllr_matches_per_pair_formula_and_bob():
    pos, neg = two_classes(149, 331, seed=7)
    slope, offset = 9.0, -3.5
    expected = per_pair_cllr(slope * pos + offset, slope * neg + offset)
    s, (p, n) = np.r_[pos, neg], counts(len(pos), len(neg))
    assert cllr(slope * s + offset, p, n) == pytest.approx(expected, abs=1e-12)
    acc = binned(pos, neg, 1 << 16)  # binned: within the bins' width times the slope
    llr = slope * bin_scores(acc.binning) + offset
    assert cllr(llr, acc.pos, acc.neg) == pytest.approx(expected, abs=slope * acc.binning.width)
    assert cllr(np.zeros(3), [1, 0, 2], [0, 5, 1]) == pytest.approx(1.0)  # llr 0 everywhere: one bit
    for (a, b), value in BOB_CLLR.items():
        assert cllr(a * np.r_[BOB_POS, BOB_NEG] + b, *counts(149, 331)) == pytest.approx(value, abs=1e-12)


def test_cllr_against_installed_bob_measure():
    calibration = pytest.importorskip(
        "bob.measure.calibration",
        reason="bob.measure is not installed here: 6.1.1 pins numpy ~=1.26 and pillow ~=10.2 (pip would downgrade "
        "this venv), and its min_cllr raises (np.float; no pavx); BOB_CLLR holds its cllr's values",
    )
    pos, neg = two_classes(149, 331, seed=7)
    assert cllr(np.r_[pos, neg] * 5 - 2, *counts(149, 331)) == pytest.approx(
        calibration.cllr(neg * 5 - 2, pos * 5 - 2), abs=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_cllr_matches_brute_force_pav(seed):
    rng = np.random.default_rng(seed)
    pos, neg = two_classes(149, 433, seed=seed)
    pos, neg = np.round(pos, 2), np.round(neg, 2)  # ties within and across the classes
    s, same = np.r_[pos, neg], np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    p, n = same.astype(float), (~same).astype(float)
    expected = brute_min_cllr(s, same)
    got = min_cllr(s, p, n)
    assert got == pytest.approx(expected, abs=1e-12)
    iso = IsotonicRegression(increasing=True).fit(s, same.astype(float)).predict(s)  # sklearn pools ties too
    with np.errstate(divide="ignore"):
        llr = np.log(iso) - np.log1p(-iso) - math.log(len(pos) / len(neg))
    sk = 0.5 * (np.logaddexp(0, -llr[same]).mean() + np.logaddexp(0, llr[~same]).mean()) / math.log(2)
    assert got == pytest.approx(sk, abs=1e-9)
    slope, offset = logistic_fit(s, p, n)
    assert got <= cllr(slope * s + offset, p, n)
    for _ in range(5):  # any other monotone map costs at least as much
        a, b, c = rng.uniform(0.1, 20), rng.uniform(-5, 5), rng.uniform(0, 3)
        assert got <= cllr(a * s + b + c * np.tanh(3 * s), p, n) + 1e-12
    assert min_cllr(np.exp(3 * s), p, n) == pytest.approx(got, abs=1e-12)  # only the order counts
    assert 0 < got < 1


def test_min_cllr_of_binned_close_to_per_pair_and_separated_classes():
    pos, neg = two_classes(300, 3000, seed=5)
    acc = binned(pos, neg, 1 << 14)
    s = np.r_[pos, neg]
    same = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    per_pair = min_cllr(s, same, ~same)
    assert min_cllr(bin_scores(acc.binning), acc.pos, acc.neg) == pytest.approx(per_pair, abs=0.01)
    apart = np.r_[pos + 10, neg]
    assert min_cllr(apart, same, ~same) == 0.0
    with pytest.raises(ValueError, match="separate"):
        logistic_fit(apart, same, ~same)
    with pytest.raises(ValueError, match="empty"):
        cllr(s, np.zeros(len(s)), np.ones(len(s)))


def test_l2_bins_are_minus_distances():
    b = Binning(0.0, 4.0, 4, "l2")  # squared distances, centres 0.5 .. 3.5
    assert bin_scores(b) == pytest.approx(-np.sqrt([0.5, 1.5, 2.5, 3.5]))
    assert bin_scores(Binning(-1.0, 1.0, 2, "cosine")) == pytest.approx([-0.5, 0.5])


def test_reliability_of_a_calibrated_system():
    rng = np.random.default_rng(11)  # llr exactly known: scores N(+-1, 1) have llr = 2 s
    pos, neg = rng.normal(1, 1, 20_000), rng.normal(-1, 1, 200_000)
    acc = binned(pos, neg, 4096)
    llr = 2 * bin_scores(acc.binning)
    r = reliability(llr, acc.pos, acc.neg, groups=10)
    assert len(r["predicted"]) == 10 and r["pairs"].sum() == len(pos) + len(neg)
    assert np.abs(r["observed"] - r["predicted"]).max() < 0.03
    assert np.all(np.diff(r["predicted_llr"]) > 0)
    assert logistic_fit(bin_scores(acc.binning), acc.pos, acc.neg) == pytest.approx((2.0, 0.0), abs=0.05)


def _score(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["score", *(str(a) for a in args)])
    return r.exit_code, r.output


def test_score_calibrate_on_end_to_end(tmp_path):
    path, _, _ = random_store(tmp_path / "s.h5", seed=2, n=149, d=16, n_ids=40)
    other, _, _ = random_store(tmp_path / "o.h5", seed=3, n=131, d=16, n_ids=30)
    src, out = tmp_path / "source", tmp_path / "out"
    assert _score(other, "--all-pairs", "--out", src, "--no-progress")[0] == 0
    code, text = _score(path, "--all-pairs", "--out", out, "--no-progress", "--calibrate-on", src)
    assert code == 0, text
    assert "Cllr" in text and "minCllr" in text
    m = json.loads((out / "metrics.json").read_text())
    c = m["calibration"]
    assert set(c) >= {"slope", "offset", "source", "cllr", "min_cllr", "source_cllr", "source_min_cllr"}
    assert (m["cllr"], m["min_cllr"]) == (c["cllr"], c["min_cllr"]) and c["min_cllr"] <= c["cllr"]
    acc, fitted = HistogramROC.load(out / "histogram.npz"), HistogramROC.load(src / "histogram.npz")
    s = bin_scores(fitted.binning)
    assert (c["slope"], c["offset"]) == pytest.approx(logistic_fit(s, fitted.pos, fitted.neg), rel=1e-12)
    assert c["cllr"] == pytest.approx(cllr(c["slope"] * bin_scores(acc.binning) + c["offset"], acc.pos, acc.neg))
    assert recognise_figure(out / "calibration.png", "calibration") is None
    code, text = _score(path, "--all-pairs", "--out", tmp_path / "x", "--calibrate-on", tmp_path / "missing")
    assert code == 2 and "error: --calibrate-on" in text and "histogram.npz" in text
    code, text = _score(path, "--all-pairs", "--metric", "cosine", "--out", tmp_path / "y", "--calibrate-on", src)
    assert code == 2 and "same --metric" in text and not (tmp_path / "y").exists()
    code, text = _score(path, "--all-pairs", "--out", src, "--overwrite", "--calibrate-on", src)
    assert code == 2 and "holds the input" in text


def test_listed_pairs_calibrated_without_out_and_refusals(tmp_path):
    rng = np.random.default_rng(6)
    path, x, labels = random_store(tmp_path / "s.h5", seed=4, n=120, d=8, n_ids=30)
    i, j = rng.integers(0, 120, 400), rng.integers(0, 120, 400)
    pairs = np.stack([i[i != j], j[i != j]], 1)
    same = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
    listed = write_store(tmp_path / "pairs.h5", x, labels, pairs, same, protocol="pairs")
    src = tmp_path / "source"
    score(ScoreConfig(store=path, out=src, progress=False))
    m = score(ScoreConfig(store=listed, all_pairs=False, calibrate_on=src, progress=False))
    d = np.sqrt(((x[pairs[:, 0]].astype(np.float64) - x[pairs[:, 1]]) ** 2).sum(1))  # exact scores: -distance
    c = m["calibration"]
    per_pair = per_pair_cllr(c["slope"] * -d[same == 1] + c["offset"], c["slope"] * -d[same == 0] + c["offset"])
    assert c["cllr"] == pytest.approx(per_pair, abs=1e-4) and c["score"] == "minus Euclidean distance"
    with pytest.raises(ValueError, match="calibrate-on"):
        ScoreConfig(store=path, rows=(0, 10), calibrate_on=src)
    with pytest.raises(ValueError, match="calibrate-on"):
        ScoreConfig(store=None, scores=tmp_path / "f.txt", calibrate_on=src)
