"""Intervals (`pipeline/metrics/intervals.py`): the all-pairs jackknife's group counts equal a brute-force count of the
pairs per pair of identity groups, on every path; the intervals hold the estimate; the listed-pairs bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.metrics.intervals import COARSE, GROUPS, bootstrap_listed, identity_groups, jackknife
from pipeline.metrics.roc import FAR_LEVELS
from tests.stores import random_store
from tests.torchrun import torchrun


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_identity_groups_are_runs_of_sorted_labels():
    labels = np.array([7, 3, 3, 9, 12, 3, 40, 7, 41, 42, 43, 44])
    g = identity_groups(labels, groups=3)
    order = np.argsort(labels, kind="stable")
    assert (np.diff(g[order]) >= 0).all()  # sorted rows: groups in runs
    assert all(len(set(g[labels == lab])) == 1 for lab in labels)  # an identity in one group
    assert sorted(set(g.tolist())) == [0, 1, 2]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_group_counts_equal_brute_force_on_every_path(tmp_path, metric):
    n = 1100
    store, x, labels = random_store(tmp_path / "s.h5", n, 30, seed=5)
    common = ("--all-pairs", "--metric", metric, "--block", "512", "--no-progress")
    assert cli("score", store, *common, "--out", tmp_path / "mem").exit_code == 0
    assert cli("score", store, *common, "--rows", "0:400", "--out", tmp_path / "p0").exit_code == 0
    assert cli("score", store, *common, "--rows", f"400:{n}", "--out", tmp_path / "p1").exit_code == 0
    assert cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged").exit_code == 0
    r = torchrun(2, "score", str(store), *common, "--out", str(tmp_path / "tr"))
    assert r.returncode == 0, r.stderr
    order = np.argsort(labels, kind="stable")  # label order: the rows the engine counts in
    ls = labels[order]
    g = identity_groups(ls)
    iu = np.triu_indices(n, 1)
    ids = (g[:, None] * GROUPS + g[None, :])[iu]
    same = (ls[:, None] == ls[None, :])[iu]
    want = [np.bincount(ids, minlength=GROUPS * GROUPS), np.bincount(ids[same], minlength=GROUPS * GROUPS)]
    first = np.load(tmp_path / "mem" / "histogram.npz")
    for run in ("mem", "merged", "tr"):
        h = np.load(tmp_path / run / "histogram.npz")
        for name, w in zip(("group_all", "group_pos"), want, strict=True):
            got = h[name].reshape(GROUPS * GROUPS, COARSE).sum(1)
            np.testing.assert_array_equal(got, w, err_msg=f"{run} {name}")
        np.testing.assert_array_equal(h["group_rows"], np.bincount(g, minlength=GROUPS))
        for k in (
            "group_all",
            "group_pos",
            "tail_neg",
            "tail_pos",
            "tail_neg_ids",
            "tail_pos_ids",
        ):
            np.testing.assert_array_equal(h[k], first[k], err_msg=f"{run} {k}")
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        lo, hi = m["auc_ci95"]
        assert lo < m["auc"] < hi and hi - lo < 0.2
        assert m["eer_ci95"][0] < m["eer"] < m["eer_ci95"][1]
        assert "jackknife" in m["ci_method"]
        low = m["tar_at_far_ci95"]["0.001"]
        assert low is None or low[0] <= m["tar_at_far"]["0.001"] <= low[1]


def test_jackknife_of_equal_replicates_is_a_point():
    assert jackknife(0.5, [0.5] * 10) == [0.5, 0.5]
    assert jackknife(0.5, [0.4]) is None


def test_bootstrap_listed_holds_the_estimate():
    rng = np.random.default_rng(0)
    positive = rng.random(2000) < 0.5
    values = rng.standard_normal(2000) + positive
    r = bootstrap_listed(values, positive, "cosine", FAR_LEVELS, rounds=200)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(positive, values)
    assert r["auc_ci95"][0] < auc < r["auc_ci95"][1] and r["auc_ci95"][1] - r["auc_ci95"][0] < 0.1
    assert set(r["tar_at_far_ci95"]) == {f"{f:g}" for f in FAR_LEVELS}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gpu_counting_keeps_the_same_tail_and_group_counts(tmp_path, metric):
    """The GPU's counting branch (run here on the CPU) keeps the same exact tail and jackknife counts as the
    CPU's, for the whole plan and for subsets of tiles merged."""
    import torch

    from pipeline.metrics.tail import tail_size
    from pipeline.scoring.blockmath import tile_plan
    from pipeline.scoring.definition import ScoreDefinition
    from pipeline.scoring.memory import MemoryRows, TorchTiles
    from pipeline.scoring.sources import choose_binning
    from pipeline.scoring.tiles import TileLoop
    from pipeline.store.layout import open_store

    path, _, _ = random_store(tmp_path / "s.h5", 301, 12, seed=4, duplicates=6)
    with open_store(path) as st_:
        prep = MemoryRows(st_, ScoreDefinition.of(st_, metric), torch.device("cpu"))
    binning = choose_binning(prep, 1 << 12)
    prep.scale_to_bins(binning)
    plan = tile_plan(prep.n, 64, leaf=16)
    k = tail_size(prep.n * (prep.n - 1) // 2, prep.stats.n_positive)
    results = {}
    for counting in ("numpy", "torch"):
        scorer = TileLoop.over(prep, TorchTiles(prep, 64), binning, counting=counting, tail_k=k)
        whole = scorer.run(plan, progress=False).roc()
        parts = [scorer.run(plan, select=range(r, len(plan), 3), progress=False).roc() for r in range(3)]
        merged = parts[0]
        for p in parts[1:]:
            merged.merge(p)
        for acc in (whole, merged):
            assert acc.tail is not None and acc.groups is not None
        results[counting] = (whole, merged)
    ref = results["numpy"][0]
    for acc in (*results["numpy"], *results["torch"]):
        for a, b in zip(acc.groups, ref.groups, strict=True):
            np.testing.assert_array_equal(a, b)
        for name in ("neg", "pos", "neg_ids", "pos_ids"):
            np.testing.assert_array_equal(getattr(acc.tail, name), getattr(ref.tail, name), err_msg=name)
        assert acc.compute()["tar_at_far"] == ref.compute()["tar_at_far"]


def test_too_few_identities_give_no_interval(tmp_path):
    """Two people: removing either leaves no different-person pair, so there is no replicate and no interval
    (not an interval of width 0)."""
    from tests.stores import write_store

    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    store = write_store(tmp_path / "s.h5", x, np.array([0] * 20 + [1] * 20))
    assert cli("score", store, "--all-pairs", "--no-progress", "--out", tmp_path / "r").exit_code == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["auc_ci95"] is None and m["eer_ci95"] is None
