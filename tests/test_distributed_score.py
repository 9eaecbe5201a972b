"""Scale-out scoring: torchrun ranks (2 and 3 gloo processes on the CPU) equal one process bit for bit; a
failing rank fails the run without a results folder; `--rows` parts merged equal the whole run; merge refuses
parts that do not belong together."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.scoring.blockmath import balance, fixed_matmul, tile_plan
from pipeline.scoring.config import parse_rows
from pipeline.scoring.stage import ScoreConfig, score
from tests.stores import BACKENDS, random_store, write_store
from tests.torchrun import torchrun


def sorted_store(path: Path, n: int, d: int, seed: int = 0, dtype: str = "float32") -> Path:
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, max(2, n // 3), size=n))
    centres = rng.standard_normal((labels.max() + 1, d)).astype(np.float32)
    x = (0.5 * centres[labels] + rng.standard_normal((n, d))).astype(dtype)
    return write_store(path, x, labels)


def same_results(a: Path, b: Path) -> None:
    ha, hb = np.load(a / "histogram.npz"), np.load(b / "histogram.npz")
    for k in ("pos", "neg", "lo", "hi", "max_distance"):
        np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma.keys() == mb.keys()  # every path writes the same keys
    how = ("seconds", "seconds_prepare", "seconds_tiles", "seconds_products", "seconds_counting", "pairs_per_second",
           "config", "backend", "parts", "world_size")  # fmt: skip
    for k in ma.keys() - set(how):
        assert ma[k] == mb[k], k


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("n_costs,parts", [(0, 3), (1, 3), (7, 2), (40, 5)])
def test_balance_deals_every_tile_once_evenly(n_costs, parts):
    costs = [int(c) for c in np.random.default_rng(n_costs).integers(1, 100, size=n_costs)]
    bins = balance(costs, parts)
    assert sorted(i for b in bins for i in b) == list(range(n_costs))
    loads = [sum(costs[i] for i in b) for b in bins]
    assert max(loads) - min(loads) <= max(costs, default=0)
    assert bins == balance(costs, parts)


def test_fixed_matmul_splits_long_inner_dimensions_exactly_enough():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((70, 600)).astype(np.float32), rng.standard_normal((90, 600)).astype(np.float32)
    out = np.empty((70, 90), np.float32)
    fixed_matmul(a, b, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b.T.astype(np.float64), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("text", ["5:5", "7:3", "a:b", "12", "-1:4"])
def test_parse_rows_rejects_bad_ranges(text):
    with pytest.raises(ValueError, match="--rows"):
        parse_rows(text)


# ---------------------------------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_one_process(tmp_path, backend):
    """An inner dimension of 302 (products in two chunks) and several tiles; the single process uses every
    thread, the ranks one each. FAISS (l2) computes the same canonical blocks, so it agrees with itself too."""
    store, _, _ = random_store(tmp_path / "s.h5", 900, 300, seed=1)
    score(ScoreConfig(store=store, out=tmp_path / "one", block=256, progress=False, backend=backend))
    r = torchrun(2, "score", str(store), "--all-pairs", "--block", "256", "--no-progress", "--backend", backend,
                 "--out", str(tmp_path / "two"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    same_results(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["world_size"] == 1
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["backend"] == backend


@pytest.mark.parametrize("n,block", [(40, 4096), (1001, 128)])
def test_three_ranks_uneven_splits(tmp_path, n, block):
    """More ranks than tiles (one tile for 3 ranks), and N not divisible by the block or the ranks."""
    assert len(tile_plan(40, 4096)) == 1
    store, _, _ = random_store(tmp_path / "s.h5", n, 16, seed=2, n_ids=max(2, n // 4))
    score(ScoreConfig(store=store, out=tmp_path / "one", block=block, progress=False, metric="cosine"))
    r = torchrun(3, "score", str(store), "--all-pairs", "--block", str(block), "--metric", "cosine", "--no-progress",
                 "--out", str(tmp_path / "three"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    same_results(tmp_path / "one", tmp_path / "three")


def test_failing_rank_fails_the_run_without_results(tmp_path):
    """Rank 0 cannot write its results (the parent of --out is a file): the run fails, nothing is written."""
    store, _, _ = random_store(tmp_path / "s.h5", 60, 8, seed=3)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = torchrun(2, "score", str(store), "--all-pairs", "--no-progress", "--out", str(blocker / "res"))
    assert r.returncode != 0
    assert "file" in r.stderr and not (blocker / "res").exists()


# ---------------------------------------------------------------------------------------------------- --rows


@pytest.mark.parametrize("metric,d,dtype", [("l2", 24, "float32"), ("cosine", 270, "float16")])
def test_rows_parts_merge_to_the_whole_run(tmp_path, metric, d, dtype):
    """Parts of uneven size (one smaller than a product's minimum side, across a tile border) merged in any
    order equal the in-memory run: same histograms, AUC and maximum pair."""
    store = sorted_store(tmp_path / "s.h5", 1300, d, seed=4, dtype=dtype)
    common = ("--all-pairs", "--block", "512", "--metric", metric, "--no-progress")
    assert cli("score", store, *common, "--out", tmp_path / "whole").exit_code == 0
    cuts = [0, 500, 510, 530, 1299, 1300]
    parts = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        res = cli("score", store, *common, "--rows", f"{a}:{b}", "--out", tmp_path / f"p{a}")
        assert res.exit_code == 0, res.output
        parts.append(tmp_path / f"p{a}")
    half = cli("merge", parts[3], parts[1], "--out", tmp_path / "half")  # partial merges merge further
    assert half.exit_code == 0 and "partial" in half.output, half.output
    res = cli("merge", tmp_path / "half", parts[4], parts[0], parts[2], "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    same_results(tmp_path / "whole", tmp_path / "merged")
    whole_rows = tmp_path / "whole_rows"  # --rows 0:N: the out-of-core path over everything
    assert cli("score", store, *common, "--rows", "0:1300", "--out", whole_rows).exit_code == 0
    same_results(tmp_path / "whole", whole_rows)


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path):
    store = sorted_store(tmp_path / "s.h5", 300, 8, seed=5)
    other = sorted_store(tmp_path / "t.h5", 301, 8, seed=6)
    base = ("--all-pairs", "--no-progress")
    assert cli("score", store, *base, "--rows", "0:100", "--out", tmp_path / "a").exit_code == 0
    assert cli("score", store, *base, "--rows", "100:300", "--bins", "1000", "--out", tmp_path / "b").exit_code == 0
    assert cli("score", store, *base, "--rows", "50:300", "--out", tmp_path / "c").exit_code == 0
    assert cli("score", store, *base, "--rows", "100:300", "--metric", "cosine", "--out", tmp_path / "d").exit_code == 0
    assert cli("score", other, *base, "--rows", "100:301", "--out", tmp_path / "e").exit_code == 0
    for bad, why in (("b", "bins"), ("c", "overlap"), ("d", "metric"), ("e", "store_n")):
        res = cli("merge", tmp_path / "a", tmp_path / bad, "--out", tmp_path / f"m{bad}")
        assert res.exit_code != 0 and why in res.output, res.output
        assert not (tmp_path / f"m{bad}").exists()
    res = cli("merge", tmp_path / "nothing", "--out", tmp_path / "mx")
    assert res.exit_code != 0


def test_rows_errors_are_clear(tmp_path):
    store = sorted_store(tmp_path / "s.h5", 50, 4)
    for rows, msg in (("5:5", "0 <= A < B"), ("x:3", "two integers"), ("0:51", "50 rows")):
        res = cli("score", store, "--all-pairs", "--rows", rows, "--out", tmp_path / "o")
        assert res.exit_code != 0 and msg in res.output, res.output
    res = cli("score", store, "--pairs", "--rows", "0:5", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "--all-pairs" in res.output


def test_store_larger_than_memory_is_scored_out_of_core(tmp_path, monkeypatch):
    import cli as cli_module

    store = sorted_store(tmp_path / "s.h5", 400, 12, seed=8)
    assert cli("score", store, "--all-pairs", "--no-progress", "--out", tmp_path / "mem").exit_code == 0
    monkeypatch.setattr(cli_module, "_larger_than_memory", lambda store, options: True)
    res = cli("score", store, "--all-pairs", "--no-progress", "--out", tmp_path / "ooc")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ooc" / "part.json").is_file()
    same_results(tmp_path / "mem", tmp_path / "ooc")


@pytest.mark.parametrize("metric,d", [("l2", 24), ("cosine", 270)])
def test_unsorted_store_scores_out_of_core(tmp_path, metric, d, monkeypatch):
    """Labels in random order: the out-of-core run (over a temporary copy in label order, which leaves nothing
    behind) and its parts merged equal the in-memory run (which sorts the rows) bit for bit."""
    store, x, labels = random_store(tmp_path / "u.h5", 1100, d, seed=9)
    assert (np.diff(labels) < 0).any()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    common = ("--all-pairs", "--block", "256", "--metric", metric, "--no-progress")
    assert cli("score", store, *common, "--out", tmp_path / "mem").exit_code == 0
    assert cli("score", store, *common, "--rows", "0:1100", "--out", tmp_path / "whole").exit_code == 0
    parts = []
    for a, b in ((0, 300), (300, 700), (700, 1100)):
        assert cli("score", store, *common, "--rows", f"{a}:{b}", "--out", tmp_path / f"p{a}").exit_code == 0
        parts.append(tmp_path / f"p{a}")
    assert cli("merge", *parts, "--out", tmp_path / "merged").exit_code == 0
    same_results(tmp_path / "mem", tmp_path / "whole")
    same_results(tmp_path / "mem", tmp_path / "merged")
    mem = json.loads((tmp_path / "mem" / "metrics.json").read_text())
    same = (labels[:, None] == labels[None, :]).sum() - len(labels)
    assert mem["n_positive"] == same // 2
    assert list(tmp.iterdir()) == []


def test_unsorted_store_without_room_for_its_sorted_copy(tmp_path, monkeypatch):
    import shutil

    store, _, _ = random_store(tmp_path / "u.h5", 300, 16, seed=9)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    res = cli("score", store, "--all-pairs", "--rows", "0:100", "--no-progress", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "TMPDIR" in res.output, res.output
    assert not (tmp_path / "o").exists()
