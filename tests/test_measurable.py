"""No figure the data cannot support: with N different-person pairs a FAR f is observed only when f N >= 1; below,
TAR at FAR f (and FNMR at FMR f) and their intervals are null, `smallest_measurable_far` (1/N) stands beside them
and `not_measurable` says why: for listed pairs, all pairs (in memory and `--rows` parts merged), score files (held
and streamed), the printed summary, the scores figure and the HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_curve

from cli import main
from pipeline.metrics.curve import FAR_LEVELS, at_far, measurable
from pipeline.report import figures
from pipeline.report.tables import report
from tests.stores import random_store, write_store

KEYS = [f"{f:g}" for f in FAR_LEVELS]


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def reference(values: np.ndarray, same: np.ndarray) -> dict:
    """scikit-learn's TAR at each FAR (similarities), null where fewer than 1/f different-person pairs."""
    fpr, tpr, _ = roc_curve(same, values)
    n_neg = int((~same).sum())
    return {f"{f:g}": float(tpr[fpr <= f].max()) if round(f * n_neg, 9) >= 1 else None for f in FAR_LEVELS}


def check(m: dict, ref: dict, null: list[str]) -> None:
    """`null` levels null with their intervals, the others equal to `ref`; the smallest FAR and the note."""
    n_neg = m["n_negative"]
    assert [k for k in KEYS if m["tar_at_far"][k] is None] == null == [k for k in KEYS if ref[k] is None]
    assert list(m["tar_at_far"]) == list(m["fnmr_at_fmr"]) == list(m["tar_at_far_ci95"]) == KEYS  # the keys stay
    for k in KEYS:
        if k in null:
            assert m["fnmr_at_fmr"][k] is None and m["tar_at_far_ci95"][k] is None, k
        else:
            assert m["tar_at_far"][k] == pytest.approx(ref[k], abs=1e-12), k
            assert m["fnmr_at_fmr"][k] == 1.0 - m["tar_at_far"][k]
    assert m["smallest_measurable_far"] == 1 / n_neg
    first, last = (f"{float(k):.0e}".replace("e-0", "e-") for k in (null[0], null[-1]))
    assert m["not_measurable"] == (
        f"TAR at FAR {first}..{last}: not measurable with {n_neg:,} different-person pairs "
        f"(smallest measurable FAR {1 / n_neg:.3g})"
    )


def test_measurable_is_one_false_accept():
    for f in FAR_LEVELS:
        n = round(1 / f)
        assert measurable(f, n) and not measurable(f, n - 1), f
    out = at_far(dict.fromkeys(KEYS, 0.25), 1000)
    assert out["tar_at_far"] == {**dict.fromkeys(KEYS[:3]), **dict.fromkeys(KEYS[3:], 0.25)}
    assert out["fnmr_at_fmr"]["0.001"] == 0.75 and out["smallest_measurable_far"] == 0.001
    assert out["not_measurable"].startswith("TAR at FAR 1e-6..1e-4: not measurable with 1,000 different")
    whole = at_far(dict.fromkeys(KEYS, 0.5), 10**6)
    assert None not in whole["tar_at_far"].values() and "not_measurable" not in whole  # the note only when needed


def test_listed_pairs(tmp_path):
    """300 same and 250 different listed pairs: 1e-6..1e-3 null, 1e-2 and 0.1 measured (bootstrap intervals)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 4)
    x = (0.8 * rng.standard_normal((100, 16))[labels] + rng.standard_normal((400, 16))).astype(np.float32)
    same_pairs = np.array([(4 * p + a, 4 * p + b) for p in range(100) for a, b in ((0, 1), (1, 2), (2, 3))])
    other = rng.choice(100, size=(250, 2), replace=True)
    other = other[other[:, 0] != other[:, 1]][:250]
    diff_pairs = np.c_[4 * other[:, 0], 4 * other[:, 1] + 1]
    pairs = np.r_[same_pairs, diff_pairs]
    flags = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
    store = write_store(tmp_path / "p.h5", x, labels, pairs, flags)
    code, text = run("score", store, "--pairs", "--metric", "cosine", "--out", tmp_path / "r")
    assert code == 0, text
    m = metrics(tmp_path / "r")
    n_neg = len(diff_pairs)
    assert m["n_negative"] == n_neg
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    values = np.einsum("ij,ij->i", u[pairs[:, 0]].astype(np.float64), u[pairs[:, 1]].astype(np.float64))
    check(m, reference(values, flags.astype(bool)), KEYS[:4])
    assert m["tar_at_far_ci95"]["0.01"] is not None and m["tar_at_far_ci95"]["0.1"] is not None
    assert f"TAR at FAR 1e-6..1e-3: not measurable with {n_neg} different-person pairs" in text


def test_all_pairs_in_memory_and_merged_parts(tmp_path):
    """90 rows of 30 people (about 3,900 different-person pairs): 1e-6..1e-4 null, 1e-3 exact (jackknife interval);
    `--rows` parts merged give the same metrics.json and say the same."""
    store, x, labels = random_store(tmp_path / "s.h5", n=90, d=8, n_ids=30, seed=3)
    common = ("--all-pairs", "--metric", "l2", "--no-progress")
    code, text = run("score", store, *common, "--out", tmp_path / "mem")
    assert code == 0, text
    for part, rows in (("p0", "0:40"), ("p1", "40:90")):
        assert run("score", store, *common, "--rows", rows, "--out", tmp_path / part)[0] == 0
    code, merged_text = run("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged")
    assert code == 0, merged_text
    iu = np.triu_indices(len(x), 1)
    d = np.linalg.norm(x[:, None, :].astype(np.float64) - x[None, :, :], axis=-1)[iu]
    ref = reference(-d, (labels[:, None] == labels[None, :])[iu])
    mem, merged = metrics(tmp_path / "mem"), metrics(tmp_path / "merged")
    check(mem, ref, KEYS[:3])
    assert mem["tar_at_far_ci95"]["0.001"] is not None
    for k in ("tar_at_far", "fnmr_at_fmr", "tar_at_far_ci95", "smallest_measurable_far", "not_measurable"):
        assert merged[k] == mem[k], k
    line = "TAR at FAR 1e-6..1e-4: not measurable with"
    assert line in text and line in merged_text


def test_score_files_held_and_streamed(tmp_path):
    """A file of 300 impostors (pyeer: bootstrap) gives 1e-6..1e-3 null; one with identities (bob4: jackknife),
    held exactly and streamed through the histogram and exact tail, gives the same nulls and values."""
    from pipeline.metrics.intervals import GROUPS
    from pipeline.scoring.file_metrics import file_metrics
    from pipeline.scoring.scorefiles import read_blocks

    rng = np.random.default_rng(5)
    gen, imp = rng.normal(1.5, 1, 200), rng.normal(0, 1, 300)
    g, i = tmp_path / "g.txt", tmp_path / "i.txt"
    g.write_text("".join(f"{v!r}\n" for v in gen.tolist()))
    i.write_text("".join(f"x {v!r}\n" for v in imp.tolist()))
    code, text = run("score", "--scores", g, "--impostor-scores", i, "--format", "pyeer", "--out", tmp_path / "p")
    assert code == 0, text
    ref = reference(np.r_[gen, imp], np.arange(500) < 200)
    check(metrics(tmp_path / "p"), ref, KEYS[:4])
    assert "TAR at FAR 1e-6..1e-3: not measurable with 300 different-person pairs" in text

    n = 5000
    same = rng.random(n) < 0.3
    values = rng.normal(0, 1, n) + 1.5 * same
    a = [f"id{k}" for k in rng.integers(0, 200, n)]
    b = [x if s else f"id{k}x" for x, s, k in zip(a, same, rng.integers(0, 200, n), strict=True)]
    path = tmp_path / "s.bob4"
    path.write_text("".join(f"{x} {y} t {v!r}\n" for x, y, v in zip(a, b, values.tolist(), strict=True)))
    read = lambda: read_blocks(path, "bob4", groups=GROUPS)  # noqa: E731
    ref = reference(values, same)
    for exact_max in (10**6, 1000):  # held, then streamed
        _, m, extra = file_metrics(read, str(path), bins=2048, seed=0, exact_max=exact_max)
        assert extra["scores_held"] == (exact_max > n) and "jackknife" in m["ci_method"]
        check(m, ref, KEYS[:3])


def test_report_and_scores_figure(tmp_path):
    """The page shows "not measurable" with the smallest FAR; the scores figure draws no threshold at an unmeasurable
    FAR 1e-3 (the ROC would give the one at FAR 0)."""
    store, _, _ = random_store(tmp_path / "s.h5", n=40, d=8, n_ids=12, seed=1)  # 700-odd different-person pairs
    assert run("score", store, "--all-pairs", "--no-progress", "--out", tmp_path / "r")[0] == 0
    m = metrics(tmp_path / "r")
    assert m["tar_at_far"]["0.001"] is None and m["tar_at_far"]["0.01"] is not None
    report([tmp_path / "r"], tmp_path / "rep", html=True)
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("not measurable") >= 4 and f"FAR &ge; {1 / m['n_negative']:.3g}" in page
    assert "f &times; N &ge; 1" in page
    roc = {"fpr": np.array([0.0, 0.0, 0.5, 1.0]), "tpr": np.array([0.0, 0.3, 0.8, 1.0]),
           "threshold": np.array([0.0, 0.2, 0.5, 1.0])}  # fmt: skip
    assert figures.operating_thresholds(m, roc).get("far") is None
    assert figures.operating_thresholds({**m, "tar_at_far": {"0.001": 0.3}}, roc)["far"] == 0.2
