"""The scoring engine against brute force and scikit-learn on awkward sizes, both metrics and backends,
float16, listed pairs with 10 folds, rank-1, bad inputs end to end through the CLI."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from pipeline.errors import PipelineError
from pipeline.report.results import FIGURE_FILES
from pipeline.scoring.blockmath import chunk_side, fixed_matmul, product_flops, tile_plan
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.memory import FaissTiles, MemoryRows, TorchTiles
from pipeline.scoring.sources import choose_binning
from pipeline.scoring.stage import score, score_all_pairs, score_store, tenfold_accuracy
from pipeline.scoring.tiles import TileLoop
from pipeline.store.layout import open_store
from tests.stores import BACKENDS, random_store, write_store


def brute_force(x: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Similarity (minus distance, or cosine) and same-person flag of every pair i < j, in float64, by a loop."""
    x = x.astype(np.float64)
    sims, same = [], []
    for i in range(len(x)):
        d = x[i + 1 :] - x[i]
        if metric == "l2":
            s = -np.sqrt((d * d).sum(1))
        else:
            s = x[i + 1 :] @ x[i] / (np.linalg.norm(x[i + 1 :], axis=1) * np.linalg.norm(x[i]))
        sims.append(s)
        same.append(labels[i + 1 :] == labels[i])
    return np.concatenate(sims), np.concatenate(same)


def check_against_sklearn(m: dict, x: np.ndarray, labels: np.ndarray, metric: str) -> None:
    s, y = brute_force(x, labels, metric)
    exact = roc_auc_score(y, s)
    assert m["n_pairs"] == len(s)
    assert m["n_positive"] == int(y.sum()) and m["n_negative"] == int((~y).sum())
    # The bound covers the binning; float32 rounding of the scores may add a few ties broken otherwise.
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-6
    assert abs(m["auc"] - exact) < 1e-4
    d = -s if metric == "l2" else 1 - s
    assert m["max_distance"] == pytest.approx(d.max(), rel=1e-9)


STORES = {
    "mixed_with_duplicates": dict(n=149, d=16, n_ids=50, duplicates=15),
    "many_singletons": dict(n=149, d=8, n_ids=140),
}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(STORES))
def test_all_pairs_match_sklearn(tmp_path, metric, backend, kind):
    path, x, labels = random_store(tmp_path / "s.h5", seed=1, **STORES[kind])
    m = score(ScoreConfig(store=path, metric=metric, backend=backend, block=33, progress=False, exact=True))
    check_against_sklearn(m, x, labels, metric)
    assert m["backend"] == (backend if metric == "l2" else "torch")  # FAISS's inner products are NumPy's
    assert m["auc_exact"] == pytest.approx(roc_auc_score(*brute_force(x, labels, metric)[::-1]), abs=1e-12)


def test_one_identity_with_many_images_and_float16(tmp_path):
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(100, int), np.arange(1, 50)]
    x = (rng.standard_normal((149, 12)) + 0.3 * (labels == 0)[:, None]).astype(np.float16)
    path = write_store(tmp_path / "f16.h5", x, labels)
    for metric in ("l2", "cosine"):
        m = score(ScoreConfig(store=path, metric=metric, block=33, progress=False))
        check_against_sklearn(m, x.astype(np.float32), labels, metric)


def test_diagonal_split_into_leaves_and_tile_subsets_add_up(tmp_path):
    path, x, labels = random_store(tmp_path / "s.h5", n=149, d=10, n_ids=30, duplicates=5, seed=2)
    cfg = ScoreConfig(store=path, block=64, progress=False)
    with open_store(path) as st_:
        acc, _ = score_all_pairs(st_, cfg, torch.device("cpu"), leaf=8)
        check_against_sklearn({**acc.compute(), "max_distance": acc.max_distance}, x, labels, "l2")
        prep = MemoryRows(st_, ScoreDefinition.of(st_, "l2"), torch.device("cpu"))
    plan = tile_plan(prep.n, 64, leaf=8)
    binning = choose_binning(prep, 1 << 12)
    prep.scale_to_bins(binning)
    extremes = {}
    backends = {"torch": lambda: TorchTiles(prep, 64)}
    if "faiss" in BACKENDS:  # FAISS's products on the same canonical blocks: whole and parts agree too
        backends["faiss"] = lambda: FaissTiles(prep, 64, binning)
    for (backend, make), counting in itertools.product(backends.items(), ("numpy", "torch")):
        # "torch" is the GPU's counting, run here on the CPU
        scorer = TileLoop.over(prep, make(), binning, counting=counting)
        whole = scorer.run(plan, progress=False)
        extremes[backend, counting] = (whole.extreme, whole.extreme_rows, whole.extreme_tile)
        parts = [scorer.run(plan, select=range(r, len(plan), 3), progress=False) for r in range(3)]
        merged = parts[0].roc()
        for p in parts[1:]:
            merged.merge(p.roc())
        w = whole.roc()
        assert (merged.pos == w.pos).all() and (merged.neg == w.neg).all()
        assert w.n_positive == prep.stats.n_positive and w.n_positive + w.n_negative == 149 * 148 // 2
        exact = roc_auc_score(*brute_force(x, labels, "l2")[::-1])
        assert abs(w.compute()["auc"] - exact) <= w.compute()["auc_error_bound"] + 1e-6
    for backend in backends:
        assert extremes[backend, "numpy"] == extremes[backend, "torch"] and extremes[backend, "numpy"][2] >= 0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gpu_counting_finds_the_same_extreme_pair_under_ties(tmp_path, metric):
    """The extreme pair repeated in many tiles (copies of two opposite rows): the GPU's counting (per-tile
    extremes kept on the device) picks the same tile and pair as the CPU's sequential scan, for every subset."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((130, 6)).astype(np.float32) * 0.1 + 1
    far = rng.choice(130, size=12, replace=False)
    x[far[:6]], x[far[6:]] = 5.0, -5.0
    path = write_store(tmp_path / "s.h5", x, rng.integers(0, 40, size=130))
    with open_store(path) as st_:
        prep = MemoryRows(st_, ScoreDefinition.of(st_, metric), torch.device("cpu"))
    binning = choose_binning(prep, 1 << 10)
    prep.scale_to_bins(binning)
    plan = tile_plan(prep.n, 32, leaf=8)
    for select in (None, range(0, len(plan), 2), range(1, len(plan), 3)):
        found = [
            (r.extreme, r.extreme_rows, r.extreme_tile)
            for r in (
                TileLoop.over(prep, TorchTiles(prep, 32), binning, counting=c).run(plan, select=select, progress=False)
                for c in ("numpy", "torch")
            )
        ]
        assert found[0] == found[1]
        i, j = found[0][1]
        assert {x[i, 0], x[j, 0]} == {5.0, -5.0}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 70), block=st.integers(1, 30), leaf=st.integers(1, 12))
def test_tile_plan_covers_every_pair_once(n, block, leaf):
    seen = np.zeros((n, n), int)
    for t in tile_plan(n, block, leaf):
        assert t.r1 - t.r0 <= block and t.c1 - t.c0 <= block
        if t.diagonal:
            assert (t.r0, t.r1) == (t.c0, t.c1)
            sub = np.triu(np.ones((t.r1 - t.r0,) * 2, int), 1)
            seen[t.r0 : t.r1, t.c0 : t.c1] += sub
        else:
            assert t.r1 <= t.c0
            seen[t.r0 : t.r1, t.c0 : t.c1] += 1
    assert (seen == np.triu(np.ones((n, n), int), 1)).all()
    # the products' flop count (the bench's GFLOP/s) is that of the blocks fixed_matmul hands over
    plan, side, handed = tile_plan(n, block, leaf), chunk_side(block), []
    for t in plan:
        a, b = np.ones((t.r1 - t.r0, 3), np.float32), np.ones((t.c1 - t.c0, 3), np.float32)
        fixed_matmul(a, b, None, side, 0 if t.diagonal else None, on_block=lambda *blk: handed.append(blk[4].size))
    assert product_flops(plan, 3, side) == 2 * 3 * sum(handed)


def test_binning_adapts_to_bunched_scores(tmp_path):
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((149, 256)), 0).astype(np.float32) + 50.0  # ReLU-like, far from 0
    labels = rng.integers(0, 40, 149)
    path = write_store(tmp_path / "relu.h5", x, labels)
    m = score(ScoreConfig(store=path, block=33, progress=False, bins=1 << 12))
    xc = x.astype(np.float64) - x.mean(0)
    provable = 4 * (xc**2).sum(1).max()  # squared distances lie in [0, (2 max norm)^2]
    assert m["bin_hi"] - m["bin_lo"] < 0.5 * provable  # the bins span the data, not the provable range
    check_against_sklearn(m, x, labels, "l2")


def test_rank1_matches_brute_force(tmp_path):
    path, x, labels = random_store(tmp_path / "s.h5", n=149, d=16, n_ids=40, duplicates=5, seed=3, signal=1.0)
    xd = x.astype(np.float64)
    dist = ((xd[:, None] - xd[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    counts = np.bincount(labels)
    q = np.flatnonzero(counts[labels] > 1)
    expected = np.mean(labels[dist[q].argmin(1)] == labels[q])
    for backend in BACKENDS:
        m = score(ScoreConfig(store=path, block=33, rank1=True, backend=backend, progress=False))
        assert m["rank1_queries"] == len(q)
        assert m["rank1_accuracy"] == pytest.approx(expected, abs=2 / len(q))  # duplicates: ties at distance 0


def _pairs_store(tmp_path, folds=True):
    rng = np.random.default_rng(6)
    n = 120
    labels = rng.integers(0, 30, n)
    x = (rng.standard_normal((30, 8))[labels] + rng.standard_normal((n, 8))).astype(np.float32)
    i, j = rng.integers(0, n, 400), rng.integers(0, n, 400)
    keep = i != j
    pairs = np.stack([i[keep], j[keep]], 1)
    same = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
    pf = (np.arange(len(pairs)) % 10).astype(np.int8) if folds else None
    return write_store(tmp_path / "pairs.h5", x, labels, pairs, same, pf, protocol="10fold"), x, pairs, same


def test_listed_pairs_exact_and_tenfold(tmp_path):
    path, x, pairs, same = _pairs_store(tmp_path)
    for metric in ("l2", "cosine"):
        m = score(ScoreConfig(store=path, all_pairs=False, metric=metric, progress=False))
        a, b = x[pairs[:, 0]].astype(np.float64), x[pairs[:, 1]].astype(np.float64)
        s = (
            -np.linalg.norm(a - b, axis=1)
            if metric == "l2"
            else (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        )
        assert m["auc"] == pytest.approx(roc_auc_score(same, s), abs=1e-12)
        assert m["auc_error_bound"] == 0 and m["n_pairs"] == len(pairs) and m["n_positive"] == same.sum()
        assert len(m["accuracy_10fold"]) == 10 and 0.5 < m["accuracy_10fold_mean"] <= 1


def test_tenfold_picks_threshold_on_other_folds():
    # fold 0 would need threshold 10, the other folds agree on 1.5 -> fold 0 is scored with 1.5
    d = np.array([1.0, 2.0, 1.0, 2.0, 9.0, 11.0])
    y = np.array([1, 0, 1, 0, 1, 0], bool)
    folds = np.array([1, 1, 2, 2, 0, 0])
    r = tenfold_accuracy(d, y, folds)
    assert r["accuracy_10fold"] == [0.5, 1.0, 1.0]
    assert r["accuracy_10fold_mean"] == pytest.approx(2.5 / 3)


def test_score_store_api_and_results_folder(tmp_path):
    path, x, labels = random_store(tmp_path / "s.h5", n=60, d=6, seed=7)
    m = score_store(path, tmp_path / "res", all_pairs=True, metric="cosine", progress=False)
    out = tmp_path / "res"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "roc.csv", "histogram.npz", *FIGURE_FILES}
    saved = json.loads((out / "metrics.json").read_text())
    for key in [
        "auc",
        "auc_error_bound",
        "n_pairs",
        "n_positive",
        "n_negative",
        "eer",
        "tar_at_far",
        "fnmr_at_fmr",
        "best_balanced_accuracy",
        "best_balanced_threshold",
        "best_unbalanced_accuracy",
        "best_unbalanced_threshold",
        "max_distance",
        "metric",
        "bins",
        "backend",
        "device",
        "seconds",
        "pairs_per_second",
        "provenance",
    ]:
        assert key in saved, key
    assert saved["auc"] == m["auc"] and set(saved["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    # the tiles' time split: products and counting, summed over the product threads
    assert saved["seconds_products"] > 0 and saved["seconds_counting"] > 0


def test_blas_threads_limited_only_while_scoring(tmp_path):
    """The product threads call NumPy's BLAS single-threaded inside the scoring call only: the limit before is
    restored after, in memory and out of core."""
    from threadpoolctl import threadpool_info

    from pipeline.scoring.blockmath import single_threaded_blas

    def blas_threads():  # NumPy's BLAS and torch's, not FAISS's (its own limit: `faiss_single_threaded`)
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "faiss" not in i["filepath"]]

    path, _, _ = random_store(tmp_path / "s.h5", n=80, d=8, seed=9)
    before = blas_threads()
    with single_threaded_blas(), single_threaded_blas():
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before
    score(ScoreConfig(store=path, progress=False))
    score(ScoreConfig(store=path, progress=False, rows=(0, 40)))
    assert blas_threads() == before


def test_config_checks():
    for bad in [dict(metric="l1"), dict(bins=1), dict(block=5000), dict(backend="annoy"), dict(variant="x"),
                dict(rows=(5, 5)), dict(rows=(0, 5), all_pairs=False), dict(rows=(0, 5), exact=True)]:  # fmt: skip
        with pytest.raises(ValueError):
            ScoreConfig(store=Path("x.h5"), **bad)


def test_faiss_missing_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    path, x, labels = random_store(tmp_path / "s.h5", n=50, d=4, seed=8)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    m = score(ScoreConfig(store=path, backend="faiss", rank1=True, progress=False))
    assert m["backend"] == "torch" and "faiss is not installed" in caplog.text
    check_against_sklearn(m, x, labels, "l2")


def test_undefined_auc_for_listed_pairs(tmp_path):
    x = np.random.default_rng(11).standard_normal((6, 3)).astype(np.float32)
    path = write_store(tmp_path / "p.h5", x, np.arange(6), np.array([[0, 1], [2, 3]]), np.array([0, 0]))
    with pytest.raises(PipelineError, match="undefined"):
        score(ScoreConfig(store=path, all_pairs=False, progress=False))


def test_real_lfw_people_slice(shared_data, shared_weights, tmp_path):
    """Real images, real SqueezeNet: all pairs of the first 40 peopleDevTest images agree with scikit-learn."""
    from pipeline.embedding.embed import EmbedConfig, embed

    store = embed(
        EmbedConfig(
            data_root=shared_data,
            protocol="people",
            split="test",
            weights=str(shared_weights),
            out=tmp_path / "p.h5",
            limit=40,
            workers=0,
            device="cpu",
        )
    )
    m = score(ScoreConfig(store=store, out=tmp_path / "res", block=16, progress=False))
    with open_store(store) as s:
        x, labels = s.rows(0, s.n), s.labels
    check_against_sklearn(m, x, labels, "l2")
    assert m["model"] == "squeezenet1_0" and m["variant"] == "pretrained" and m["protocol"] == "people"


def test_bench_score_rows_and_table(tmp_path):
    from benchmarks.bench_score import format_table, run_method, write_random_store

    path = write_random_store(tmp_path / "r.h5", 300, 16)
    rows = [run_method(m, str(path), 300, 16, "cpu", 1 << 12, 10_000) for m in ("ours l2", "scikit-learn exact")]
    assert rows[0]["pairs"] == 300 * 299 // 2 and rows[0]["seconds"] > 0 and rows[0]["floor"] > 0
    assert rows[1]["note"].startswith("~")  # 44,850 pairs > 10,000: extrapolated from the first rows
    split = rows[0]["note"].split("preparation + tiles, ms: ")[1].split(", ")  # each call's two parts
    assert "first (cold)" in rows[0]["note"] and len(split) == 3 and all(len(c.split("+")) == 2 for c in split)
    assert rows[0]["products"] > 0 and rows[0]["counting"] > 0 and rows[0]["gflops"] > 0 and rows[0]["blas_gflops"] > 0
    table = format_table(rows)
    assert table.startswith("| store | method |") and "ours l2" in table and "| products s |" in table
    assert "BLAS libraries of a method process: " in table


def test_bench_machine_names_the_kernels_and_rates():
    from benchmarks.machine import command

    r = CliRunner().invoke(command, ["--mb", "2"])
    assert r.exit_code == 0, r.output
    rate = float(r.output.split("float32 product | ")[1].split(" GFLOP/s")[0])
    assert rate > 0 and "NumPy's BLAS" in r.output and "first touch of a new 2 MB array" in r.output
    cpu = r.output.split("| CPU | ")[1].split(" |")[0]
    if Path("/proc/cpuinfo").is_file():  # Linux: named with its family and model (two EPYCs share a name)
        assert " family " in cpu and " model " in cpu and "logical CPUs" in cpu, cpu
    assert "| OPENBLAS_CORETYPE | " in r.output
