"""The project's figures against pyeer's and bob.measure's (test-only oracles, where they install) on the same
score files: every (FMR, FNMR) point they report lies on the project's ROC, EER within pyeer's interval, FNMR at
FMR equal to the lowest FNMR of their curves at FMR <= the level, AUC equal to pyeer's trapezoids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_oracles import our_points
from pipeline.metrics.intervals import GROUPS
from pipeline.scoring.file_metrics import file_metrics
from pipeline.scoring.scorefiles import read_blocks


@pytest.fixture(params=[(613, 2011, 2), (57, 3001, 3)], ids=["ties", "few-genuine"])
def lists(request, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Genuine and impostor lists written as pyeer reads them (scores rounded: ties), and the project's figures on
    the files."""
    n_pos, n_neg, digits = request.param
    rng = np.random.default_rng(n_pos)
    gen, imp = np.round(rng.normal(1.5, 1, n_pos), digits), np.round(rng.normal(0, 1, n_neg), digits)
    g, i = tmp_path / "genuine.txt", tmp_path / "impostor.txt"
    g.write_text("".join(f"{v!r}\n" for v in gen.tolist()))
    i.write_text("".join(f"{v!r}\n" for v in imp.tolist()))
    _, m, _ = file_metrics(lambda: read_blocks(g, "pyeer", i, groups=GROUPS), str(g), 4096, 0)
    return gen, imp, m


def test_against_pyeer(lists):
    stats = pytest.importorskip("pyeer.eer_stats", reason="pyeer is not installed (the dev extra has it)")
    gen, imp, m = lists
    thr, fm, fnm = stats.calculate_roc(gen, imp, rates=False)
    theirs = set(zip(fm.astype(int).tolist(), fnm.astype(int).tolist(), strict=True))
    assert theirs == our_points(gen, imp) - {(0, len(gen))}  # every distinct score as threshold; ours: also none
    fmr, fnmr = fm / len(imp), fnm / len(gen)
    _, low, high, _ = stats.get_eer_values(fmr, fnmr)
    assert low - 1e-12 <= m["eer"] <= high + 1e-12  # interpolated between the two points pyeer chooses from
    for f, ours in m["fnmr_at_fmr"].items():
        if ours is None:  # fewer impostors than 1/f: not measurable
            assert float(f) * len(imp) < 1 and m["smallest_measurable_far"] == 1 / len(imp)
            continue
        ok = fmr <= float(f)
        assert ours == pytest.approx(fnmr[ok].min() if ok.any() else 1.0, abs=1e-12), f
    assert m["auc"] == pytest.approx(stats.calculate_roc_auc(fmr, fnmr), abs=1e-12)


def test_against_bob_measure(lists):
    bm = pytest.importorskip(
        "bob.measure", reason="bob.measure is not installed (6.1 pins numpy 1.26; `cli.py bench oracles "
        "--oracle-python` runs it from a venv of its own)",
    )  # fmt: skip
    gen, imp, m = lists
    far, frr = bm.roc(imp, gen, 200)
    points = set(zip(np.rint(far * len(imp)).astype(int).tolist(), np.rint(frr * len(gen)).astype(int).tolist(),
                     strict=True))  # fmt: skip
    assert points <= our_points(gen, imp)
    for f, ours in m["fnmr_at_fmr"].items():
        if ours is None:  # fewer impostors than 1/f: not measurable
            continue
        t = bm.far_threshold(imp, gen, float(f))
        their_far, their_frr = bm.farfrr(imp, gen, t)
        assert their_far <= float(f) and ours <= their_frr + 1e-12  # its threshold sits on a score: never better
