"""Score offsets (cohort score normalisation, `/score_offsets`): every scoring path scores cos - o_i - o_j, against
brute force and scikit-learn on awkward sizes; `--rows` parts and torchrun ranks equal one process bit for bit;
`--no-score-norm` is the plain cosine; l2 and malformed offsets are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score, roc_curve

from cli import main
from pipeline.errors import PipelineError
from pipeline.metrics.roc import FAR_LEVELS, HistogramROC
from pipeline.metrics.tail import tail_size
from pipeline.scoring.blockmath import tile_plan
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.memory import MemoryRows, TorchTiles
from pipeline.scoring.sources import choose_binning
from pipeline.scoring.stage import score, score_rows
from pipeline.scoring.tiles import TileLoop
from pipeline.store.layout import OFFSETS, SCORE_NORM, open_store
from tests.stores import BACKENDS, random_store, write_store
from tests.test_distributed_score import same_results
from tests.torchrun import torchrun

NORM = "cohort mean, test"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def add_offsets(path: Path, offsets, norm: str | None = NORM) -> Path:
    with h5py.File(path, "a") as f:
        f.create_dataset(OFFSETS, data=offsets)
        if norm is not None:
            f.attrs[SCORE_NORM] = norm
    return path


def offsets_store(path: Path, n: int, d: int, seed: int = 0, n_ids: int | None = None, duplicates: int = 0,
                  spread: tuple[float, float] = (-0.1, 0.45)):  # fmt: skip
    """A random store (labels in random order, `duplicates` copies of rows, same person) with random offsets."""
    store, x, labels = random_store(path, n, d, n_ids=n_ids, seed=seed, duplicates=duplicates)
    o = np.random.default_rng(seed + 100).uniform(*spread, size=n).astype(np.float32)
    return add_offsets(store, o), x, labels, o


def unit_rows(x: np.ndarray) -> np.ndarray:
    """The rows as the engine normalises them (float64 norms, float32 division), as float64."""
    x = x.astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    return (x / np.sqrt(sq)[:, None].astype(np.float32)).astype(np.float64)


def brute(x: np.ndarray, labels: np.ndarray, o: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """float64 value cos - o_i - o_j and same-person flag of every pair i < j; identical rows have cosine 1."""
    u = x.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cos = u @ u.T
    cos[(x[:, None, :] == x[None, :, :]).all(-1)] = 1.0
    cos = np.minimum(cos, 1.0)
    if o is not None:
        cos = cos - o.astype(np.float64)[:, None] - o.astype(np.float64)[None, :]
    iu = np.triu_indices(len(x), 1)
    return cos[iu], (labels[:, None] == labels[None, :])[iu]


def sklearn_tar(values: np.ndarray, same: np.ndarray) -> dict:
    fpr, tpr, _ = roc_curve(same, values)
    n_neg = int((~same).sum())  # a level below one false accept is not measurable: null
    return {f"{f:g}": float(tpr[fpr <= f].max()) if round(f * n_neg, 9) >= 1 else None for f in FAR_LEVELS}


def check(m: dict, values: np.ndarray, same: np.ndarray) -> None:
    """metrics.json against scikit-learn over the float64 values: AUC within the binning bound, TAR at FAR exact
    (one genuine pair) as far as the tail reaches, the largest distance 1 - value."""
    exact = roc_auc_score(same, values)
    assert m["n_pairs"] == len(values) and m["n_positive"] == int(same.sum())
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-6, (m["auc"], exact)
    assert m["max_distance"] == pytest.approx(float((1.0 - values).max()), rel=1e-6)
    n_pos = int(same.sum())
    for f, tar in sklearn_tar(values, same).items():
        if tar is None:
            assert m["tar_at_far"][f] is None, f
        elif float(f) <= m["tail_exact_far"]:
            assert abs(m["tar_at_far"][f] - tar) * n_pos <= 1.0 + 1e-9, (f, m["tar_at_far"][f], tar)


# ---------------------------------------------------------------------------------------------------- units


def test_augment_adds_a_column_only_with_offsets():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 5)).astype(np.float32)
    o = rng.uniform(-0.2, 0.5, 37).astype(np.float32)
    cosine, with_offsets = ScoreDefinition("cosine"), ScoreDefinition("cosine", o)
    assert cosine.width(5) == 6 and with_offsets.width(5) == 7 and ScoreDefinition("l2").width(5) == 7
    plain = [np.empty((37, 6), np.float32) for _ in range(2)]
    cosine.augment(x, None, *plain)
    assert (plain[0][:, 5] == 1).all() and (plain[1][:, 5] == 0).all()
    left, right = (np.empty((37, 7), np.float32) for _ in range(2))
    with_offsets.augment(x, None, left, right, o)
    np.testing.assert_array_equal(left[:, :5], plain[0][:, :5])  # the same unit rows
    np.testing.assert_array_equal(left[:, 5], -o)
    assert (left[:, 6] == 1).all() and (right[:, 5] == 1).all()
    np.testing.assert_array_equal(right[:, 6], -o)
    want = unit_rows(x) @ unit_rows(x).T - o[:, None] - o[None, :]
    np.testing.assert_allclose(left.astype(np.float64) @ right.T.astype(np.float64), want, atol=1e-6)


def test_bin_range_widens_with_offsets():
    def bin_range(vmin, vmax, metric, max_norm, offsets=None):  # offsets: (smallest, largest)
        return ScoreDefinition(metric, None if offsets is None else np.array(offsets)).bin_range(vmin, vmax, max_norm)

    assert bin_range(-0.3, 0.9, "cosine", 1.0) == bin_range(-0.3, 0.9, "cosine", 1.0, None)
    lo, hi = bin_range(-3.0, 3.0, "cosine", 1.0)
    assert (lo, hi) == (-1.0 - 1e-4, 1.0 + 1e-4)
    lo, hi = bin_range(-3.0, 3.0, "cosine", 1.0, (-0.2, 0.4))
    assert -1.8 - 1e-3 < lo < -1.8 and 1.4 < hi < 1.4 + 1e-3  # [-1 - 2 max o, 1 - 2 min o]
    lo, hi = bin_range(-1.5, -0.2, "cosine", 1.0, (0.3, 0.4))
    assert lo < -1.5 < -0.2 < hi  # the sample's values are far outside [-1, 1]'s usual place


@pytest.mark.parametrize("make", ["length", "shape", "nan", "inf", "text", "group"])
def test_malformed_offsets_are_refused(tmp_path, make):
    store, _, _ = random_store(tmp_path / "s.h5", 20, 4, seed=1)
    with h5py.File(store, "a") as f:
        if make == "group":
            f.create_group(OFFSETS)
        else:
            bad = {
                "length": np.zeros(19, np.float32),
                "shape": np.zeros((20, 1), np.float32),
                "nan": np.r_[np.zeros(7), np.nan, np.zeros(12)].astype(np.float32),
                "inf": np.r_[np.zeros(19), np.inf].astype(np.float32),
                "text": np.array(["a"] * 20, dtype=h5py.string_dtype()),
            }[make]
            f.create_dataset(OFFSETS, data=bad)
    what = {"length": r"\(19,\)", "shape": r"\(20, 1\)", "nan": "row 7", "inf": "row 19", "text": "type",
            "group": "a group"}[make]  # fmt: skip
    with pytest.raises(PipelineError, match=f"score_offsets.*{what}.*re-embed"):
        open_store(store)
    r = cli("score", store, "--all-pairs", "--metric", "cosine", "--out", tmp_path / "res", "--no-progress")
    assert r.exit_code == 2 and "score_offsets" in r.output and "re-embed" in r.output
    assert not (tmp_path / "res").exists()


def test_l2_is_refused_unless_no_score_norm(tmp_path):
    store, x, labels, o = offsets_store(tmp_path / "s.h5", 90, 6, seed=2)
    with pytest.raises(PipelineError, match="--metric cosine.*--no-score-norm"):
        score(ScoreConfig(store=store, metric="l2", progress=False))
    with pytest.raises(PipelineError, match="--metric cosine"):
        score_rows(ScoreConfig(store=store, metric="l2", progress=False))
    for extra in ((), ("--rows", "0:40")):
        r = cli("score", store, "--all-pairs", "--out", tmp_path / "l2", "--no-progress", *extra)
        assert r.exit_code == 2 and "--metric cosine" in r.output and NORM in r.output, r.output
    plain = write_store(tmp_path / "plain.h5", x, labels)
    m = score(ScoreConfig(store=store, metric="l2", progress=False, score_norm=False))
    assert m["score_norm"] is None
    assert m["auc"] == score(ScoreConfig(store=plain, metric="l2", progress=False))["auc"]


# ---------------------------------------------------------------------------------------------------- all pairs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,n_ids,block", [(3, 4, 2, 4096), (67, 9, 60, 16), (1201, 30, 400, 256)])
def test_all_pairs_match_sklearn(tmp_path, backend, n, d, n_ids, block):
    """Identities of one image among them (67 rows, 60 people), duplicated rows, blocks that cut the store."""
    store, x, labels, o = offsets_store(tmp_path / "s.h5", n, d, seed=n, n_ids=n_ids, duplicates=n // 20)
    if n == 3:
        labels = np.array([5, 1, 5])
        store = add_offsets(write_store(tmp_path / "three.h5", x, labels), o)
    m = score(ScoreConfig(store=store, metric="cosine", backend=backend, block=block, progress=False, exact=True))
    values, same = brute(x, labels, o)
    check(m, values, same)
    assert m["score_norm"] == NORM and m["metric"] == "cosine" and m["backend"] == "torch"  # FAISS's: NumPy's
    # --exact: float64 values of the rows the engine normalised, minus the offsets
    u = unit_rows(x)
    iu = np.triu_indices(n, 1)
    exact = (u @ u.T - o.astype(np.float64)[:, None] - o.astype(np.float64)[None, :])[iu]
    assert m["auc_exact"] == pytest.approx(roc_auc_score(same, exact), abs=1e-12)
    if n > 3:
        plain = roc_auc_score(*brute(x, labels, None)[::-1])
        assert abs(plain - m["auc"]) > 10 * m["auc_error_bound"] + 1e-6  # the offsets changed the result


def test_duplicate_rows_are_exact_ties(tmp_path):
    """Identical rows with small offsets are the most similar pairs: 30 different-person and 20 same-person pairs
    at exactly 1 - 2 x 0.01 (tied: TAR at FAR 1e-5 is 0, not what float32 noise would make of them), and 10
    different-person pairs of identical rows with unequal offsets at 0.97. Every path gives TAR at FAR exactly."""
    rng = np.random.default_rng(7)
    _, x, labels = random_store(tmp_path / "s.h5", 1500, 24, n_ids=500, seed=7)
    o = rng.uniform(0.2, 0.4, 1500).astype(np.float32)
    src, dst = rng.choice(1500, size=(2, 60), replace=False)
    x[dst], labels[dst] = x[src], labels[src]
    labels[dst[:40]] += 1000  # other people
    o[dst] = o[src] = 0.01
    o[dst[:10]] = 0.02  # identical rows with unequal offsets
    store = add_offsets(write_store(tmp_path / "dup.h5", x, labels), o)
    values, same = brute(x, labels, o)
    assert sklearn_tar(values, same)["1e-05"] == 0.0
    common = ("--all-pairs", "--metric", "cosine", "--block", "512", "--bins", "256", "--no-progress")
    assert cli("score", store, *common, "--out", tmp_path / "mem").exit_code == 0
    assert cli("score", store, *common, "--rows", "0:700", "--out", tmp_path / "p0").exit_code == 0
    assert cli("score", store, *common, "--rows", "700:1500", "--out", tmp_path / "p1").exit_code == 0
    assert cli("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged").exit_code == 0
    runs = ["mem", "merged"]
    if "faiss" in BACKENDS:
        assert cli("score", store, *common, "--backend", "faiss", "--out", tmp_path / "faiss").exit_code == 0
        runs.append("faiss")
    for run in runs:
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        check(m, values, same)
        assert m["tar_at_far"]["1e-05"] == 0.0
    np.testing.assert_array_equal(*(np.load(tmp_path / r / "histogram.npz")["tail_neg"] for r in ("mem", "merged")))


def test_gpu_counting_branch_equals_cpu_counting(tmp_path):
    """The GPU's counting (torch, run here on the CPU) bins and tails the offset values as the CPU's does."""
    store, x, labels, o = offsets_store(tmp_path / "s.h5", 300, 12, seed=9, duplicates=12)
    with open_store(store) as st_:
        prep = MemoryRows(st_, ScoreDefinition.of(st_, "cosine"), torch.device("cpu"))
    assert prep.left.shape[1] == 12 + 2
    binning = choose_binning(prep, 1 << 10)
    prep.scale_to_bins(binning)
    plan = tile_plan(prep.n, 64, leaf=16)
    k = tail_size(prep.n * (prep.n - 1) // 2, prep.stats.n_positive)  # the K whose start `choose_binning` estimated
    runs = [TileLoop.over(prep, TorchTiles(prep, 64), binning, counting=c, tail_k=k).run(plan, progress=False)
            for c in ("numpy", "torch")]  # fmt: skip
    a, b = (r.roc() for r in runs)
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.neg, b.neg)
    np.testing.assert_array_equal(a.tail.neg, b.tail.neg)
    np.testing.assert_array_equal(a.tail.pos, b.tail.pos)
    assert runs[0].extreme_rows == runs[1].extreme_rows
    values, same = brute(x, labels, o)
    assert abs(a.compute()["auc"] - roc_auc_score(same, values)) <= a.compute()["auc_error_bound"] + 1e-6


def test_rows_parts_and_torchrun_equal_one_process(tmp_path):
    """One process, three `--rows` parts merged (labels in random order: the sorted copy) and two torchrun ranks:
    the same histograms, tail and metrics, bit for bit; an inner dimension of 255 + 2 (two product chunks)."""
    store, x, labels, o = offsets_store(tmp_path / "s.h5", 1100, 255, seed=4, duplicates=30)
    common = ("--all-pairs", "--metric", "cosine", "--block", "512", "--no-progress")
    assert cli("score", store, *common, "--out", tmp_path / "mem").exit_code == 0
    cuts = [0, 300, 700, 1100]
    for k in range(3):
        r = cli("score", store, *common, "--rows", f"{cuts[k]}:{cuts[k + 1]}", "--out", tmp_path / f"p{k}")
        assert r.exit_code == 0, r.output
    assert cli("merge", tmp_path / "p2", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged").exit_code == 0
    r = torchrun(2, "score", str(store), *common, "--out", str(tmp_path / "tr"))
    assert r.returncode == 0, r.stderr
    for run in ("merged", "tr"):
        same_results(tmp_path / "mem", tmp_path / run)
        a, b = np.load(tmp_path / "mem" / "histogram.npz"), np.load(tmp_path / run / "histogram.npz")
        for k in ("tail_neg", "tail_pos", "tail_neg_ids", "group_all", "group_pos"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{run} {k}")
    m = json.loads((tmp_path / "mem" / "metrics.json").read_text())
    assert m["score_norm"] == NORM
    check(m, *brute(x, labels, o))
    # parts with and without the offsets do not merge
    r = cli("score", store, *common, "--rows", "300:1100", "--no-score-norm", "--out", tmp_path / "raw")
    assert r.exit_code == 0
    r = cli("merge", tmp_path / "p0", tmp_path / "raw", "--out", tmp_path / "mixed")
    assert r.exit_code == 2 and "score_norm" in r.output


@pytest.mark.parametrize("rows", [None, "0:40"])
def test_no_score_norm_is_the_plain_cosine(tmp_path, rows):
    store, x, labels, _ = offsets_store(tmp_path / "s.h5", 150, 7, seed=5, duplicates=5)
    plain = write_store(tmp_path / "plain.h5", x, labels)
    extra = () if rows is None else ("--rows", rows)
    common = ("--all-pairs", "--metric", "cosine", "--block", "64", "--no-progress", *extra)
    assert cli("score", store, *common, "--no-score-norm", "--out", tmp_path / "raw").exit_code == 0
    assert cli("score", plain, *common, "--out", tmp_path / "plain").exit_code == 0
    assert cli("score", store, *common, "--out", tmp_path / "norm").exit_code == 0
    a, b = np.load(tmp_path / "raw" / "histogram.npz"), np.load(tmp_path / "plain" / "histogram.npz")
    assert a.files == b.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if rows is None:
        ma, mb = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("raw", "plain"))
        assert ma["score_norm"] is None and mb["score_norm"] is None
        assert (ma["auc"], ma["tar_at_far"], ma["max_distance"]) == (mb["auc"], mb["tar_at_far"], mb["max_distance"])
        mn = json.loads((tmp_path / "norm" / "metrics.json").read_text())
        assert mn["score_norm"] == NORM and mn["auc"] != ma["auc"]
        assert mn["config"]["score_norm"] is True and ma["config"]["score_norm"] is False


def test_cli_end_to_end(tmp_path):
    """`cli.py score FILE --all-pairs --metric cosine --out DIR` on a store with offsets: the results folder, and
    the store's `score_norm` in metrics.json; a store with offsets but no attribute names the dataset."""
    store, x, labels, o = offsets_store(tmp_path / "s.h5", 240, 10, seed=6, duplicates=6)
    r = cli("score", store, "--all-pairs", "--metric", "cosine", "--out", tmp_path / "res", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "AUC" in r.output
    assert {"metrics.json", "roc.csv", "roc.png", "histogram.npz"} <= {p.name for p in (tmp_path / "res").iterdir()}
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    check(m, *brute(x, labels, o))
    assert m["score_norm"] == NORM and m["provenance"][SCORE_NORM] == NORM
    bare = add_offsets(write_store(tmp_path / "bare.h5", x, labels), o, norm=None)
    assert score(ScoreConfig(store=bare, metric="cosine", progress=False))["score_norm"] == OFFSETS


# ---------------------------------------------------------------------------------------------------- other paths


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_rows(tmp_path, n):
    x = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
    store = add_offsets(write_store(tmp_path / "s.h5", x, np.arange(n)), np.full(n, 0.1, np.float32))
    with open_store(store) as st_:
        assert st_.offsets.tolist() == pytest.approx([0.1] * n)
    want = "at least two" if n == 1 else "undefined"
    with pytest.raises(PipelineError, match=want):
        score(ScoreConfig(store=store, metric="cosine", progress=False))
    with pytest.raises(PipelineError, match=want):
        score_rows(ScoreConfig(store=store, metric="cosine", progress=False, out=tmp_path / "rows"))


DEVICE = os.environ.get("TEST_GPU_DEVICE", "cuda")


@pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scoring_with_offsets(tmp_path):
    """torch.mm and histc on the GPU: the CPU's bins, a pair at most in a neighbouring bin; rank-1 the same."""
    store, x, labels, o = offsets_store(tmp_path / "s.h5", 1500, 64, seed=12, duplicates=20)
    got = {}
    for where, device in (("cpu", "cpu"), ("gpu", DEVICE)):
        m = score(ScoreConfig(store=store, metric="cosine", device=device, rank1=True, progress=False,
                              out=tmp_path / where))  # fmt: skip
        got[where] = (m, HistogramROC.load(tmp_path / where / "histogram.npz"))
        check(m, *brute(x, labels, o))
    (mc, hc), (mg, hg) = got["cpu"], got["gpu"]
    assert hc.binning == hg.binning and mg["score_norm"] == NORM
    moved = (np.abs(hc.pos - hg.pos).sum() + np.abs(hc.neg - hg.neg).sum()) // 2
    assert moved <= 1e-4 * mc["n_pairs"]
    assert mc["rank1_accuracy"] == mg["rank1_accuracy"]
