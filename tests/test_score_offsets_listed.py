"""Score offsets in the listed-pair paths: `score --pairs` (float64) and rank-1 identification (the gallery's
offsets change the nearest neighbour), against brute force and scikit-learn; the all-pairs paths are in
tests/test_score_offsets.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.scoring.stage import ScoreConfig, score
from tests.stores import write_store
from tests.test_score_offsets import BACKENDS, NORM, add_offsets, cli, unit_rows


def _pairs_store(tmp_path: Path):
    rng = np.random.default_rng(8)
    n = 130
    labels = rng.integers(0, 30, n)
    x = (rng.standard_normal((30, 8))[labels] + rng.standard_normal((n, 8))).astype(np.float32)
    i, j = rng.integers(0, n, 500), rng.integers(0, n, 500)
    pairs = np.stack([i[i != j], j[i != j]], 1)
    same = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
    folds = (np.arange(len(pairs)) % 10).astype(np.int8)
    o = rng.uniform(-0.2, 0.5, n).astype(np.float32)
    store = write_store(tmp_path / "pairs.h5", x, labels, pairs, same, folds, protocol="10fold")
    return add_offsets(store, o), x, labels, o, pairs, same


def test_listed_pairs(tmp_path):
    store, x, _, o, pairs, same = _pairs_store(tmp_path)
    a, b = x[pairs[:, 0]].astype(np.float64), x[pairs[:, 1]].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    values = cos - o[pairs[:, 0]].astype(np.float64) - o[pairs[:, 1]].astype(np.float64)
    m = score(ScoreConfig(store=store, all_pairs=False, metric="cosine", progress=False))
    assert m["auc"] == pytest.approx(roc_auc_score(same, values), abs=1e-12)
    assert m["max_distance"] == pytest.approx((1 - values).max(), rel=1e-12)
    assert m["score_norm"] == NORM and len(m["accuracy_10fold"]) == 10
    raw = score(ScoreConfig(store=store, all_pairs=False, metric="cosine", progress=False, score_norm=False))
    assert raw["auc"] == pytest.approx(roc_auc_score(same, cos), abs=1e-12) and raw["score_norm"] is None
    r = cli("score", store, "--pairs", "--out", tmp_path / "l2")
    assert r.exit_code == 2 and "--metric cosine" in r.output


def rank1_brute(x: np.ndarray, labels: np.ndarray, o: np.ndarray | None) -> tuple[float, int]:
    u = unit_rows(x)
    v = u @ u.T - (0.0 if o is None else o.astype(np.float64)[None, :])  # the query's own offset ranks nothing
    np.fill_diagonal(v, -np.inf)
    q = np.flatnonzero(np.bincount(labels)[labels] > 1)
    return float(np.mean(labels[v[q].argmax(1)] == labels[q])), len(q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank1_takes_the_gallerys_offsets(tmp_path, backend):
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 60, 400)
    x = (rng.standard_normal((60, 12))[labels] * 0.8 + rng.standard_normal((400, 12))).astype(np.float32)
    o = rng.uniform(-0.3, 0.3, 400).astype(np.float32)  # larger than most gaps: nearest neighbours change
    twin = int(np.flatnonzero(labels == labels[0])[1])
    pairs, pair_labels = np.array([[0, twin], [0, int(np.argmax(labels != labels[0]))]]), np.array([1, 0])
    store = add_offsets(write_store(tmp_path / "s.h5", x, labels, pairs, pair_labels), o)
    want, n_q = rank1_brute(x, labels, o)
    plain, _ = rank1_brute(x, labels, None)
    assert abs(want - plain) * n_q >= 5  # the test can tell the two apart
    for all_pairs in (True, False):  # --pairs --rank1: rank-1 over every image too
        m = score(ScoreConfig(store=store, metric="cosine", rank1=True, backend=backend, block=128,
                              all_pairs=all_pairs, progress=False))  # fmt: skip
        assert m["rank1_queries"] == n_q
        assert m["rank1_accuracy"] == pytest.approx(want, abs=1.5 / n_q)  # one float32 near-tie at most
    m = score(ScoreConfig(store=store, metric="cosine", rank1=True, backend=backend, progress=False, score_norm=False))
    assert m["rank1_accuracy"] == pytest.approx(plain, abs=1.5 / n_q)
