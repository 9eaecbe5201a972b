"""`cli.py compare` (`pipeline/metrics/paired.py`, `pipeline/report/compare.py`): the paired jackknife of all pairs
against a brute-force paired jackknife over identity groups from per-pair scores, the paired bootstrap of listed
pairs against a brute-force one with scikit-learn, DeLong's test against its definition, a result against itself,
refusals of different pairs, and the per-pair scores listed pairs keep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import auc, roc_auc_score, roc_curve

from cli import main
from pipeline.metrics.intervals import GROUPS, Z95, identity_groups
from pipeline.metrics.paired import delong, normal_p
from tests.stores import random_store, write_store


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def score(store, out, *args):
    code, text = cli("score", store, "--no-progress", "--out", out, *args)
    assert code == 0, text
    return json.loads((out / "metrics.json").read_text())


def compared(a, b, out, *args) -> dict:
    code, text = cli("compare", a, b, "--out", out, *args)
    assert code == 0, text
    assert "| AUC |" in text
    return json.loads((out / "comparison.json").read_text())


# ---------------------------------------------------------------------------------------------------- references


def eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The rate where false accepts equal false rejects, interpolated between ROC points."""
    d = fpr - (1 - tpr)
    k = int(np.flatnonzero(d >= 0)[0])
    if k == 0:
        return float(fpr[0])
    t = -d[k - 1] / (d[k] - d[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def metric_values(y: np.ndarray, s: np.ndarray, fars) -> dict:
    """AUC, EER and TAR at each FAR (the largest TPR of scikit-learn's ROC points with FPR <= FAR)."""
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    tars = {f"{f:g}": float(tpr[fpr <= f + 1e-12].max()) for f in fars}
    return {"auc": auc(fpr, tpr), "eer": eer(fpr, tpr), **tars}


def delong_reference(sa, sb, y) -> tuple[float, float]:
    """(AUC_B - AUC_A, its variance) from DeLong's definition: psi over every (same, different) pair of pairs."""
    v10, v01, aucs = [], [], []
    for s in (sa, sb):
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    m, n = len(v10[0]), len(v01[0])

    def cov(v, k, j):
        return float(((v[k] - v[k].mean()) * (v[j] - v[j].mean())).sum() / (len(v[k]) - 1))

    s = [[cov(v10, k, j) / m + cov(v01, k, j) / n for j in (0, 1)] for k in (0, 1)]
    return aucs[1] - aucs[0], s[0][0] + s[1][1] - 2 * s[0][1]


def similarities(x: np.ndarray, metric: str) -> np.ndarray:
    """[n, n] similarity of every pair: cosine, or minus the Euclidean distance."""
    x = x.astype(np.float64)
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return u @ u.T
    sq = (x * x).sum(1)
    return -np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None))


# ---------------------------------------------------------------------------------------------------- statistics


def test_delong_equals_its_definition_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(149) < 0.4
    sa = np.round(rng.standard_normal(149) + y, 1)  # rounded: many ties
    sb = np.round(rng.standard_normal(149) + 1.5 * y, 1)
    d = delong(sa, sb, y)
    diff, var = delong_reference(sa, sb, y)
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, sa), abs=1e-12)
    assert d["auc_b"] == pytest.approx(roc_auc_score(y, sb), abs=1e-12)
    assert d["difference"] == pytest.approx(diff, abs=1e-12)
    assert d["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert d["p_value"] == pytest.approx(math.erfc(abs(diff) / math.sqrt(var) / math.sqrt(2)), rel=1e-9)
    same = delong(sa, sa, y)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["p_value"] == 1


def test_normal_p():
    assert normal_p(0.0, 0.0) == 1.0 and normal_p(0.1, 0.0) == 0.0
    assert normal_p(Z95 * 0.01, 0.01) == pytest.approx(0.05, abs=1e-9)


# ---------------------------------------------------------------------------------------------------- all pairs


def test_all_pairs_jackknife_equals_brute_force(tmp_path):
    n, d = 600, 8
    pa, x, labels = random_store(tmp_path / "a.h5", n, d, n_ids=150, seed=11, signal=1.0)
    rng = np.random.default_rng(12)
    x2 = (x + 0.6 * rng.standard_normal(x.shape)).astype(np.float32)  # another system: the same images, noisier
    pb = write_store(tmp_path / "b.h5", x2, labels)
    ma = score(pa, tmp_path / "ra", "--all-pairs", "--metric", "cosine")
    mb = score(pb, tmp_path / "rb", "--all-pairs")  # l2: systems may differ in their metric
    c = compared(tmp_path / "ra", tmp_path / "rb", tmp_path / "cmp")
    assert c["auc"]["a"] == ma["auc"] and c["auc"]["b"] == mb["auc"] and "jackknife" in c["method"]

    iu = np.triu_indices(n, 1)
    y = (labels[:, None] == labels[None, :])[iu]
    sa, sb = similarities(x, "cosine")[iu], similarities(x2, "l2")[iu]
    g = identity_groups(labels)
    gi, gj = g[iu[0]], g[iu[1]]
    fars = [f for f in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) if c["tar_at_far"][f"{f:g}"]["ci95"] is not None]
    assert fars == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    tail = {"1e-05", "0.0001", "0.001"}  # the exact tail reaches these in every replicate; beyond, the coarse bins
    full = {k: metric_values(y, sb, fars)[k] - v for k, v in metric_values(y, sa, fars).items()}
    reps = []
    for grp in range(GROUPS):
        keep = (gi != grp) & (gj != grp)
        ra, rb = metric_values(y[keep], sa[keep], fars), metric_values(y[keep], sb[keep], fars)
        reps.append({k: rb[k] - ra[k] for k in ra})
    for key in ("auc", "eer", *(f"{f:g}" for f in fars)):
        e = c[key] if key in ("auc", "eer") else c["tar_at_far"][key]
        r = np.array([rep[key] for rep in reps])
        se = math.sqrt((GROUPS - 1) / GROUPS * ((r - r.mean()) ** 2).sum())
        exact = key in tail  # TAR from the exact tail; AUC, EER and the other TARs' replicates from 1024 coarse bins
        assert e["difference"] == pytest.approx(full[key], abs=1e-12 if exact or key[0] == "0" else 3e-4), key
        # coarse: AUC within 1%, EER within 5%; TAR beyond the tail within 15% (this store's 176 pairs a coarse bin;
        # 1% on the 6.9 M pairs of LFWPeople test, docs/scoring.md)
        rel = 1e-9 if exact else {"auc": 0.01, "eer": 0.05}.get(key, 0.15)
        assert e["se"] == pytest.approx(se, rel=rel), key
        assert se > 0.001, key
        lo, hi = e["ci95"]
        assert (lo + hi) / 2 == pytest.approx(e["difference"], abs=1e-12)
        assert (hi - lo) / 2 == pytest.approx(Z95 * e["se"], rel=1e-12)
        assert e["p_value"] == pytest.approx(normal_p(e["difference"], e["se"]), rel=1e-12)


def test_a_result_against_itself_and_refusals(tmp_path):
    pa, x, labels = random_store(tmp_path / "a.h5", 150, 8, n_ids=40, seed=1)
    score(pa, tmp_path / "ra", "--all-pairs")
    c = compared(tmp_path / "ra", tmp_path / "ra", tmp_path / "self")
    entries = [c["auc"], c["eer"], *(e for e in c["tar_at_far"].values() if e["ci95"] is not None)]
    assert len(entries) >= 4
    for e in entries:
        assert e["difference"] == 0 and e["ci95"] == [0, 0] and e["p_value"] == 1
    # a store is scored first, with score's defaults: the same result
    code, text = cli("compare", pa, tmp_path / "ra")
    assert code == 0 and "| AUC | " in text and "[+0.0000, +0.0000] | 1 |" in text, text
    # another store: other pairs
    pc, _, _ = random_store(tmp_path / "c.h5", 151, 8, n_ids=40, seed=1)
    score(pc, tmp_path / "rc", "--all-pairs")
    code, text = cli("compare", tmp_path / "ra", tmp_path / "rc")
    assert code == 2 and text.startswith("error: ") and text.count("\n") == 1 and "same pairs" in text
    # the same counts, other identities in the groups
    relabelled = labels.copy()
    relabelled[labels == labels[0]] = labels.max() + 1
    pd = write_store(tmp_path / "d.h5", x, relabelled)
    md = score(pd, tmp_path / "rd", "--all-pairs")
    if md["n_positive"] == c["n_positive"]:
        code, text = cli("compare", tmp_path / "ra", tmp_path / "rd")
        assert code == 2 and "identity groups" in text
    # --out: only a folder compare wrote is replaced, and only with --overwrite
    code, text = cli("compare", tmp_path / "ra", tmp_path / "ra", "--out", tmp_path / "self")
    assert code == 2 and "--overwrite" in text
    assert cli("compare", tmp_path / "ra", tmp_path / "ra", "--out", tmp_path / "self", "--overwrite")[0] == 0
    code, text = cli("compare", tmp_path / "ra", tmp_path / "ra", "--out", tmp_path / "rc", "--overwrite")
    assert code == 2 and "refusing to replace" in text and (tmp_path / "rc" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------------- listed pairs


def listed_stores(tmp_path, n_pairs=400):
    rng = np.random.default_rng(6)
    _, x, labels = random_store(tmp_path / "s.h5", seed=4, n=120, d=8, n_ids=30)
    i, j = rng.integers(0, 120, n_pairs), rng.integers(0, 120, n_pairs)
    pairs = np.stack([i[i != j], j[i != j]], 1)
    same = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
    x2 = (x + 0.8 * rng.standard_normal(x.shape)).astype(np.float32)
    a = write_store(tmp_path / "pa.h5", x, labels, pairs, same, protocol="pairs")
    b = write_store(tmp_path / "pb.h5", x2, labels, pairs, same, protocol="pairs")
    return a, b, x, x2, pairs, same.astype(bool)


def test_listed_pairs_keep_their_scores_and_bootstrap_equals_brute_force(tmp_path):
    a, b, x, x2, pairs, y = listed_stores(tmp_path)
    score(a, tmp_path / "ra", "--pairs", "--metric", "cosine")
    score(b, tmp_path / "rb", "--pairs")
    ha, hb = np.load(tmp_path / "ra" / "histogram.npz"), np.load(tmp_path / "rb" / "histogram.npz")
    sa, sb = similarities(x, "cosine")[pairs[:, 0], pairs[:, 1]], similarities(x2, "l2")[pairs[:, 0], pairs[:, 1]]
    assert ha["pair_scores"].dtype == np.float64
    np.testing.assert_allclose(ha["pair_scores"], sa, atol=1e-12)
    np.testing.assert_allclose(hb["pair_scores"], sb, atol=1e-9)
    np.testing.assert_array_equal(ha["pair_labels"], y)
    assert str(ha["pair_set"]) == str(hb["pair_set"]) and len(str(ha["pair_set"])) == 64

    c = compared(tmp_path / "ra", tmp_path / "rb", tmp_path / "cmp", "--seed", "5")
    assert "bootstrap" in c["method"] and "rounds" in c["method"]
    rng = np.random.default_rng(5)  # the same resampled pairs, drawn as the bootstrap draws them
    fars = [float(k) for k, e in c["tar_at_far"].items() if e["a"] is not None]
    assert fars == [1e-2, 1e-1]  # fewer than 1,000 different-person pairs: the lower levels are not measurable
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, len(y), len(y))
        ra, rb = metric_values(y[i], ha["pair_scores"][i], fars), metric_values(y[i], hb["pair_scores"][i], fars)
        diffs.append({k: rb[k] - ra[k] for k in ra})
    for key in ("auc", "eer", *(f"{f:g}" for f in fars)):
        e = c[key] if key in ("auc", "eer") else c["tar_at_far"][key]
        r = np.array([dd[key] for dd in diffs])
        np.testing.assert_allclose(e["ci95"], np.percentile(r, [2.5, 97.5]), atol=1e-12, err_msg=key)
        assert e["se"] == pytest.approx(r.std(ddof=1), rel=1e-9), key
        assert e["p_value"] == pytest.approx(normal_p(e["b"] - e["a"], e["se"]), rel=1e-12)
    diff, var = delong_reference(sa, sb, y)
    assert c["delong"]["difference"] == pytest.approx(diff, abs=1e-12)
    assert c["delong"]["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert c["auc"]["difference"] == pytest.approx(diff, abs=1e-9)

    s = compared(tmp_path / "ra", tmp_path / "ra", tmp_path / "self")
    for e in [s["auc"], s["eer"], *(s["tar_at_far"][f"{f:g}"] for f in fars)]:
        assert e["difference"] == 0 and e["ci95"] == [0, 0] and e["p_value"] == 1
    assert s["delong"]["p_value"] == 1
    # report compares the results of the same pairs it is given
    code, text = cli("report", tmp_path / "ra", tmp_path / "rb", "--out", tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert code == 0 and "## Paired comparisons" in table and "DeLong" in table and table in text
    assert f"| AUC | {c['auc']['a']:.4f} | {c['auc']['b']:.4f} | {c['auc']['difference']:+.4f} |" in table


def test_listed_pairs_of_other_pairs_are_refused(tmp_path):
    a, _, x, _, pairs, y = listed_stores(tmp_path)
    score(a, tmp_path / "ra", "--pairs")
    other = write_store(tmp_path / "o.h5", x, np.arange(len(x)), pairs[::-1], y[::-1].astype(np.int8))
    score(other, tmp_path / "ro", "--pairs")  # the same pairs in another order
    code, text = cli("compare", tmp_path / "ra", tmp_path / "ro")
    assert code == 2 and text.startswith("error: ") and "listed pairs differ" in text, text
    score(a, tmp_path / "all", "--all-pairs")
    code, text = cli("compare", tmp_path / "ra", tmp_path / "all")
    assert code == 2 and "same pairs" in text
    np.savez(tmp_path / "ra" / "histogram.npz", **{k: v for k, v in np.load(tmp_path / "ra" / "histogram.npz").items()
                                                 if not k.startswith("pair_")})  # fmt: skip
    code, text = cli("compare", tmp_path / "ra", tmp_path / "ra")
    assert code == 2 and "per-pair scores" in text
