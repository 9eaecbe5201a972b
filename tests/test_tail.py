"""The exact tail (`pipeline/metrics/tail.py`): TAR at FAR and FNMR at FMR equal scikit-learn's `roc_curve` values
within one genuine pair at every level, on every path (one process, torch counting, `--rows` parts merged,
torchrun), where the bins alone would be far off; tails merge in any grouping to the same arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_curve

from cli import main
from pipeline.metrics.roc import FAR_LEVELS
from pipeline.metrics.tail import Tail, tail_size
from tests.stores import random_store
from tests.torchrun import torchrun


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sklearn_tar(x: np.ndarray, labels: np.ndarray, metric: str) -> tuple[dict, int]:
    """scikit-learn's TAR at FAR over exact float64 scores: identical rows are exact ties (distance 0, cosine 1)."""
    from scipy.spatial.distance import pdist

    x = x.astype(np.float64)
    iu = np.triu_indices(len(x), 1)
    if metric == "l2":
        score = -pdist(x)  # differences first: identical rows give exactly 0
    else:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        score = np.minimum((u @ u.T)[iu], 1.0)
        score[pdist(x) == 0] = 1.0
    same = (labels[:, None] == labels[None, :])[iu]
    fpr, tpr, _ = roc_curve(same, score)
    n_neg = int((~same).sum())  # a level below one false accept is not measurable: null
    tar = {f"{f:g}": float(tpr[fpr <= f].max()) if round(f * n_neg, 9) >= 1 else None for f in FAR_LEVELS}
    return tar, int(same.sum())


@pytest.mark.parametrize("metric,n,d", [("l2", 1499, 40), ("cosine", 1201, 300)])
def test_tar_at_far_is_exact_on_every_path(tmp_path, metric, n, d):
    store, x, labels = random_store(tmp_path / "s.h5", n, d, seed=11, duplicates=60)  # labels in random order
    ref, n_pos = sklearn_tar(x, labels, metric)
    common = ("--all-pairs", "--metric", metric, "--block", "512", "--bins", "256", "--no-progress")  # coarse bins
    assert cli("score", store, *common, "--out", tmp_path / "mem").exit_code == 0
    assert cli("score", store, *common, "--rows", f"0:{n // 3}", "--out", tmp_path / "p0").exit_code == 0
    assert cli("score", store, *common, "--rows", f"{n // 3}:{n}", "--out", tmp_path / "p1").exit_code == 0
    assert cli("merge", tmp_path / "p1", tmp_path / "p0", "--out", tmp_path / "merged").exit_code == 0
    r = torchrun(2, "score", str(store), *common, "--out", str(tmp_path / "tr"))
    assert r.returncode == 0, r.stderr
    for run in ("mem", "merged", "tr"):
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        assert m["tail_exact_far"] >= 0.001
        for f, tar in ref.items():
            if float(f) > m["tail_exact_far"]:  # beyond the tail: the bins answer (coarse here)
                continue
            if tar is None:  # the cosine store: fewer than 10^6 different-person pairs, so FAR 1e-6 is null
                assert m["tar_at_far"][f] is None and m["fnmr_at_fmr"][f] is None, (run, f)
                assert m["tar_at_far_ci95"][f] is None and m["smallest_measurable_far"] == 1 / m["n_negative"]
                continue
            assert abs(m["tar_at_far"][f] - tar) * n_pos <= 1.0 + 1e-9, (run, f, m["tar_at_far"][f], tar)
            assert m["fnmr_at_fmr"][f] == 1.0 - m["tar_at_far"][f]
        tails = np.load(tmp_path / run / "histogram.npz")
        first = np.load(tmp_path / "mem" / "histogram.npz")
        np.testing.assert_array_equal(tails["tail_neg"], first["tail_neg"])
        np.testing.assert_array_equal(tails["tail_pos"], first["tail_pos"])


def test_tails_merge_in_any_grouping():
    rng = np.random.default_rng(3)
    neg, pos = rng.standard_normal(5000).astype(np.float32), rng.standard_normal(300).astype(np.float32) - 1
    for metric in ("l2", "cosine"):
        whole = Tail(200, metric)
        whole.add(neg, pos)
        whole.finish()
        parts = [Tail(200, metric) for _ in range(3)]
        for k, (a, b) in enumerate(((0, 10), (10, 4000), (4000, 5000))):
            for s in range(a, b, 97):  # many small blocks
                parts[k].add(neg[s : min(s + 97, b)], pos[(s * 300) // 5000 : (min(s + 97, b) * 300) // 5000])
        merged = parts[2].merge(parts[0]).merge(parts[1]).finish()
        np.testing.assert_array_equal(merged.neg, whole.neg)
        np.testing.assert_array_equal(merged.pos, whole.pos)
        best = np.sort(neg)[:200] if metric == "l2" else np.sort(neg)[::-1][:200]
        np.testing.assert_array_equal(whole.neg, best)


def test_tail_size_bounds():
    assert tail_size(10, 10) == 1
    assert tail_size(6_872_778, 25_000) == int(0.002 * (6_872_778 - 25_000)) + 1
    assert tail_size(5 * 10**9, 10**6) == 1 << 20


def test_duplicate_ids_need_identical_rows_not_only_equal_norms():
    from pipeline.metrics.tail import duplicate_ids

    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 4.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    sq = (x.astype(np.float64) ** 2).sum(1)  # rows 0, 1, 2, 4, 5 share a norm; only equal rows are twins
    ids = duplicate_ids(sq, lambda i: x[i])
    assert ids.tolist() == [0, 1, 0, -1, 1, 0]
    assert duplicate_ids(np.array([1.0, 2.0, 3.0]), lambda i: x[i]) is None
