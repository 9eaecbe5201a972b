"""Streaming histogram ROC against scikit-learn's exact AUC, and the metrics derived from the histograms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from pipeline.errors import PipelineError
from pipeline.metrics.roc import Binning, HistogramROC, exact_auc, exact_counts, roc_metrics, thin_roc


def _scores(rng, n=2000, ties=True):
    y = rng.random(n) < 0.3
    v = rng.normal(0, 1, n) + 0.8 * y  # cosine-like: larger = same
    if ties:
        v = np.round(v, 1)
    return v, y


def _acc(v, y, metric, bins=4096, lo=None, hi=None):
    acc = HistogramROC(
        Binning(float(v.min()) if lo is None else lo, float(v.max()) if hi is None else hi, bins, metric)
    )
    acc.update(v, y)
    return acc


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_histogram_auc_within_bound_of_sklearn(metric):
    rng = np.random.default_rng(0)
    v, y = _scores(rng)
    if metric == "l2":
        v = (v.max() - v) ** 2  # squared distance: small = same
    exact = roc_auc_score(y, -v if metric == "l2" else v)
    m = _acc(v, y, metric).compute()
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-12
    assert exact_auc(v, y, metric) == pytest.approx(exact, abs=1e-12)
    assert m["n_positive"] == y.sum() and m["n_negative"] == (~y).sum() and m["n_pairs"] == len(y)


def test_fine_bins_match_exact_closely_and_ties_count_half():
    v = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])  # squared distances, each value shared by a same and a different
    y = np.array([1, 0, 1, 0, 1, 0], bool)
    m = _acc(v, y, "l2", bins=3).compute()
    assert m["auc"] == pytest.approx(roc_auc_score(y, -v)) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    v, y = _scores(rng, 5000, ties=False)
    m = _acc(v, y, "cosine", bins=1 << 18).compute()
    assert abs(m["auc"] - roc_auc_score(y, v)) < 1e-5


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(-50, 50), st.booleans()), min_size=2, max_size=300),
    bins=st.integers(2, 500),
    scale=st.sampled_from([1.0, 0.01, 37.5]),
    metric=st.sampled_from(["l2", "cosine"]),
    pad=st.floats(-0.5, 0.5),
)
def test_property_streamed_auc_within_reported_bound(data, bins, scale, metric, pad):
    """Any scores (many ties), any binning (also narrower than the data: edge bins), any split into updates."""
    v = np.array([d[0] for d in data], dtype=np.float64) * scale
    y = np.array([d[1] for d in data])
    if y.all() or not y.any():
        with pytest.raises(PipelineError, match="undefined"):
            _acc(v, y, metric, bins, lo=float(v.min()) - 1, hi=float(v.max()) + 1).compute()
        return
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo or 1.0
    lo, hi = lo + pad * span, hi - pad * span  # pad > 0: values outside the range
    if not hi > lo:
        lo, hi = min(lo, hi) - 1, max(lo, hi) + 1
    acc = HistogramROC(Binning(lo, hi, bins, metric))
    half = len(v) // 2
    acc.update(v[:half], y[:half])
    acc.update(v[half:], y[half:])
    m = acc.compute()
    exact = roc_auc_score(y, -v if metric == "l2" else v)
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-12
    assert 0 <= m["eer"] <= 1 and 0 <= m["best_unbalanced_accuracy"] <= 1 and 0 <= m["best_balanced_accuracy"] <= 1


def test_merge_equals_one_accumulator_and_checks_binning():
    rng = np.random.default_rng(2)
    v, y = _scores(rng)
    b = Binning(-5.0, 5.0, 1000, "cosine")
    whole, a, c = HistogramROC(b), HistogramROC(b), HistogramROC(b)
    whole.update(v, y)
    a.update(v[:700], y[:700])
    c.update(v[700:], y[700:])
    a.merge(c)
    assert (a.pos == whole.pos).all() and (a.neg == whole.neg).all()
    assert a.compute()["auc"] == whole.compute()["auc"]
    with pytest.raises(ValueError, match="different binnings"):
        a.merge(HistogramROC(Binning(-5.0, 5.0, 999, "cosine")))


def test_add_counts_rejects_inconsistent_counts():
    acc = HistogramROC(Binning(0.0, 1.0, 4, "l2"))
    acc.add_counts(np.array([3, 2, 0, 1]), np.array([1, 2, 0, 0]))
    assert acc.pos.tolist() == [1, 2, 0, 0] and acc.neg.tolist() == [2, 0, 0, 1]
    with pytest.raises(RuntimeError):
        acc.add_counts(np.array([1, 0, 0, 0]), np.array([0, 1, 0, 0]))


def test_metrics_on_a_hand_example():
    # distances (l2, exact groups): same pairs at 1, 2; different at 3, 4 -> perfect separation
    pos, neg, thr = exact_counts(np.array([1.0, 4.0, 9.0, 16.0]), np.array([1, 1, 0, 0], bool), "l2")
    m = roc_metrics(pos, neg, thr, max_distance=4.0, exact=True)
    assert m["auc"] == 1.0 and m["eer"] == 0.0 and m["best_unbalanced_accuracy"] == 1.0
    assert m["best_unbalanced_threshold"] == 2.0 and m["best_unbalanced_threshold_normalised"] == 0.5
    assert m["best_balanced_accuracy"] == 1.0 and m["best_balanced_threshold"] == 2.0
    levels = ("1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1")
    # two different-person pairs: no level down to 0.1 allows a false accept, so none is measurable
    assert m["tar_at_far"] == dict.fromkeys(levels) and m["fnmr_at_fmr"] == dict.fromkeys(levels)
    assert m["smallest_measurable_far"] == 0.5 and m["not_measurable"].startswith("TAR at FAR 1e-6..1e-1: not meas")
    # reversed: all same pairs farther than all different ones
    pos, neg, thr = exact_counts(np.array([1.0, 4.0, 9.0, 16.0]), np.array([0, 0, 1, 1], bool), "l2")
    m = roc_metrics(pos, neg, thr, max_distance=4.0, exact=True)
    assert m["auc"] == 0.0 and m["eer"] == 1.0 and m["best_unbalanced_accuracy"] == 0.5


def test_eer_interpolates():
    v = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # cosine
    y = np.array([1, 0, 1, 0, 1, 0], bool)
    pos, neg, thr = exact_counts(v, y, "cosine")
    m = roc_metrics(pos, neg, thr, max_distance=0.6, exact=True)
    assert m["eer"] == pytest.approx(1 / 3)
    assert thr[0] == pytest.approx(0.1)  # distance = 1 - cosine, most similar first


def test_undefined_auc_is_a_clear_error():
    acc = HistogramROC(Binning(0.0, 1.0, 10, "l2"))
    acc.update(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(PipelineError, match="no same-person pair"):
        acc.compute()


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    v, y = _scores(rng)
    acc = _acc(v, y, "cosine", bins=300)
    acc.max_distance = 1.7
    acc.save(tmp_path / "h.npz")
    back = HistogramROC.load(tmp_path / "h.npz")
    assert back.binning == acc.binning and (back.pos == acc.pos).all() and back.max_distance == 1.7
    assert back.compute()["auc"] == acc.compute()["auc"]


def test_binning_checks():
    with pytest.raises(ValueError, match="hi > lo"):
        Binning(1.0, 1.0, 10, "l2")
    with pytest.raises(ValueError, match="metric"):
        Binning(0.0, 1.0, 10, "manhattan")


def test_thin_roc_keeps_ends_and_shape():
    fpr = np.linspace(0, 1, 100_001)
    tpr = np.sqrt(fpr)
    keep = thin_roc(fpr, tpr, steps=256)
    assert keep[0] == 0 and keep[-1] == len(fpr) - 1 and len(keep) < 20_000
    assert np.abs(np.interp(fpr, fpr[keep], tpr[keep]) - tpr).max() < 2 / 256


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_exact_metrics_in_chunks_equal_one_chunk(metric, chunk):
    """The exact groups swept chunk by chunk (as for 10^7 scores) give the figures of one sweep over all groups
    (`exact_counts` + `roc_metrics`), ties across chunk edges included; AUC equal to scikit-learn's."""
    from pipeline.metrics.curve import exact_metrics

    rng = np.random.default_rng(chunk)
    v, y = _scores(rng, n=1999)
    v = np.abs(v) if metric == "l2" else v
    pos, neg, thr = exact_counts(v, y, metric)
    whole = roc_metrics(pos, neg, thr, float(np.max(v if metric == "l2" else 1 - v) ** (0.5 if metric == "l2" else 1)),
                        exact=True)  # fmt: skip
    parts = exact_metrics(v[y].copy(), v[~y].copy(), metric, chunk=chunk)
    for k, want in whole.items():
        if k == "roc":
            continue
        got = parts[k]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), k
        else:
            assert got == want, k
    auc = roc_auc_score(y, -v if metric == "l2" else v)
    assert parts["auc"] == pytest.approx(auc, abs=1e-12)
    # the thinned curve of several chunks runs through the whole curve's points
    f, t = whole["roc"]["fpr"], whole["roc"]["tpr"]
    pf, pt = parts["roc"]["fpr"], parts["roc"]["tpr"]
    assert pf[0] == 0 and pf[-1] == 1 and pt[-1] == 1
    assert set(zip(pf.tolist(), pt.tolist(), strict=True)) <= set(zip(f.tolist(), t.tolist(), strict=True))
