"""The brute-force reference (`tests/identify_reference.py`) on hand-worked examples: no project code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.identify_reference import (
    FPIRS,
    Store,
    Trial,
    curve_sizes,
    fpir_k,
    identity_scores,
    read_split,
    reference,
    search,
    to_units,
    trial_figures,
)
from tests.stores import write_store

# ---------------------------------------------------------------------------------------------------------------
# The reference on hand-worked examples (no project code)

# l2, D = 2, integer rows (every squared distance exact). People A (label 0), B (1) enrolled; C, E, F not.
HAND_X = np.array([[0, 0], [10, 0], [1, 0], [4, 0], [0, 3], [5, 1], [0, 2], [9, 0]], np.float32)
HAND_LABELS = np.array([0, 1, 0, 1, 0, 2, 3, 4])
HAND_DISTRACTOR = np.array([[2, 0]], np.float32)  # G: an identity of its own


def hand_split(path: Path) -> Path:
    rows = [(0, 0, "gallery"), (0, 1, "gallery"), (0, 2, "mated"), (0, 3, "mated"), (0, 4, "mated")]
    rows += [(1, 4, "gallery"), (1, 1, "gallery"), (1, 0, "mated"), (1, 2, "mated"), (1, 3, "mated")]
    rows += [(t, r, "nonmated") for t in (0, 1) for r in (5, 6, 7)]
    path.write_text("trial,row,role\n" + "".join(f"{t},{r},{role}\n" for t, r, role in rows))
    return path


def test_reference_by_hand_l2():
    """Trial 0 of `hand_split` worked by hand. Gallery A0 (0,0), B0 (10,0); mated A1 (1,0), B1 (4,0), A2 (0,3);
    non-mated C (5,1), E (0,2), F (9,0). Squared distances: A1: mate 1, B 81 (rank 1); B1: mate 36, A 16 (rank
    2); A2: mate 9, B 109 (rank 1); best of C, E, F: 26, 4, 1. With distractor G (2,0): A1-G 1 ties the mate (rank
    2, a near-tie), B1-G 4 (rank 3), A2-G 13 (rank 1); C, E, F best 10, 4, 1."""
    store = Store(HAND_X.astype(np.float64), HAND_LABELS, None)
    trial = Trial(np.array([0, 1]), np.array([2, 3, 4]), np.array([5, 6, 7]))
    s = search(store, trial, metric="l2")
    assert s.rows.tolist() == [2, 3, 4, 5, 6, 7] and s.mated.tolist() == [True] * 3 + [False] * 3
    assert to_units(s.mate[:3], "l2").tolist() == [1, 36, 9] and s.rank[:3].tolist() == [1, 2, 1]
    assert to_units(s.top, "l2").tolist() == [81, 16, 109, 26, 4, 1] and not s.near.any()
    # sorted non-mated similarities t = -1, -4, -26 (n = 3). f = 0.001: k = 0, t_1 = -1: A1 (distance 1) is not
    # strictly above it (a near-tie with the threshold); 0.34: k = 1, accepted below distance 4: A1; 0.67: k = 2,
    # below 26: A1, A2; 1: k = 3 = n, every rank-1 search: A1, A2.
    fig = trial_figures(s, max_rank=3, fpirs=("0.001", "0.34", "0.67", "1"), fars=("0.67",))
    assert fig["cmc"] == pytest.approx([2 / 3, 1, 1])
    assert fig["fnir_at_fpir"] == pytest.approx({"0.001": 1, "0.34": 2 / 3, "0.67": 1 / 3, "1": 1 / 3})
    assert fig["dir_at_far"] == pytest.approx({"0.67": 2 / 3})
    assert fig["fpir_thresholds"] == {"0.001": -1, "0.34": -4, "0.67": -26, "1": -math.inf}
    assert (fig["n_mated"], fig["n_nonmated"]) == (3, 3)
    assert fig["slack"] == pytest.approx({"cmc": 0, "0.001": 1 / 3, "0.34": 0, "0.67": 0, "1": 0})
    assert fig["near_threshold"] == pytest.approx({"0.001": 1 / 3, "0.34": 0, "0.67": 0, "1": 0})

    g = Store(HAND_DISTRACTOR.astype(np.float64), None, None)
    s = search(store, trial, [g], metric="l2")
    assert to_units(s.mate[:3], "l2").tolist() == [1, 36, 9] and s.rank[:3].tolist() == [2, 3, 1]
    assert to_units(s.top, "l2").tolist() == [1, 4, 13, 10, 4, 1] and s.near.tolist() == [True] + [False] * 5
    fig = trial_figures(s, max_rank=3, fpirs=("0.34", "0.67"), fars=())
    assert fig["cmc"] == pytest.approx([1 / 3, 2 / 3, 1])
    assert fig["fnir_at_fpir"] == pytest.approx({"0.34": 1, "0.67": 2 / 3})  # A2 (9) below t_3 (10)
    assert fig["slack"]["cmc"] == pytest.approx(1 / 3)
    # no distractor at all: as without the store
    s0 = search(store, trial, [g], metric="l2", n_distractors=0)
    assert s0.rank[:3].tolist() == [1, 2, 1]


def test_reference_by_hand_files(tmp_path):
    """`reference` from files: trial 0 as above, trial 1 with gallery A2 (0,3), B0 (10,0) and mated A0, A1, B1.
    Trial 1, squared distances with G: A0: mate 9, G 4 (rank 2); A1: mate 10, G 1 (rank 2); B1: mate 36, A 25,
    G 4 (rank 3); C, E, F best 10, 1, 1. CMC (R = 3): trial 0 [1/3, 2/3, 1], trial 1 [0, 2/3, 1]. Every FPIR
    level here has k = 0: t_1 (distance 1) accepts no search, FNIR 1, DIR 0."""
    store = write_store(tmp_path / "hand.h5", HAND_X, HAND_LABELS)
    g = write_store(tmp_path / "g.h5", HAND_DISTRACTOR, None)
    split = hand_split(tmp_path / "split.csv")
    trials = read_split(split)
    assert list(trials) == [0, 1] and trials[1].gallery.tolist() == [4, 1] and trials[1].nonmated.tolist() == [5, 6, 7]

    ref = reference(store, split, metric="l2", max_rank=3)
    assert [t["cmc"] for t in ref["trials"]] == [pytest.approx([2 / 3, 1, 1])] * 2
    assert ref["cmc"] == pytest.approx([2 / 3, 1, 1]) and "distractor_curve" not in ref

    ref = reference(store, split, [g], metric="l2", max_rank=3)
    t1 = ref["trials"][1]["searches"]
    assert t1.rows.tolist() == [0, 2, 3, 5, 6, 7] and t1.rank[:3].tolist() == [2, 2, 3]
    assert to_units(t1.mate[:3], "l2").tolist() == [9, 10, 36] and to_units(t1.top, "l2").tolist() == [
        4,
        1,
        4,
        10,
        1,
        1,
    ]
    assert ref["cmc"] == pytest.approx([1 / 6, 2 / 3, 1])
    assert ref["fnir_at_fpir"] == pytest.approx(dict.fromkeys(FPIRS, 1.0))
    assert ref["dir_at_far"] == pytest.approx({"0.01": 0.0})
    assert ref["slack"]["cmc"] == pytest.approx(1 / 6)  # A1 of trial 0 ties G
    assert ref["distractor_curve"] == [
        {"distractors": 1, "rank1": pytest.approx(1 / 6), "fnir_at_fpir_0.01": 1.0,
         "slack": {"rank1": pytest.approx(1 / 6), "fnir_at_fpir_0.01": pytest.approx(1 / 6)}}
    ]  # fmt: skip
    assert ref["n_distractors"] == 1


def test_reference_by_hand_cosine_templates():
    """Cosine with offsets. Person 0's gallery (1,0) o=0.2 and (0,1) o=0.4, person 1's (0,-2) o=0; probe (3,3) of
    person 0 with o=0.1; non-mated (-1,0) with o=0. best: max(cos45 - 0.1 - 0.2, cos45 - 0.1 - 0.4) = cos45 - 0.3;
    mean: the mean of the unit rows (0.5, 0.5) has cosine 1 with the probe, template offset (0.2 + 0.4) / 2:
    1 - 0.1 - 0.3 = 0.6. Person 1: cos135 - 0.1. The non-mated probe: person 0 best max(-1 - 0.2, 0 - 0.4) = -0.4,
    mean cos135 - 0.3; person 1: cos90 = 0."""
    x = np.array([[1, 0], [0, 1], [3, 3], [0, -2], [-1, 0]], np.float64)
    store = Store(x, np.array([0, 0, 0, 1, 2]), np.array([0.2, 0.4, 0.1, 0.0, 0.0]))
    gallery, probes, c45 = np.array([0, 1, 3]), np.array([2, 4]), math.sqrt(0.5)
    s, persons = identity_scores(store, gallery, probes, metric="cosine", template="best")
    assert persons.tolist() == [0, 1]
    np.testing.assert_allclose(s, [[c45 - 0.3, -c45 - 0.1], [-0.4, 0.0]], atol=1e-12)
    s, _ = identity_scores(store, gallery, probes, metric="cosine", template="mean")
    np.testing.assert_allclose(s, [[0.6, -c45 - 0.1], [-c45 - 0.3, 0.0]], atol=1e-12)
    s, _ = identity_scores(store, gallery, probes, metric="cosine", template="mean", score_norm=False)
    np.testing.assert_allclose(s, [[1.0, -c45], [-c45, 0.0]], atol=1e-12)
    d = Store(np.array([[1.0, 1.0], [0.0, 1.0]]), None, np.array([0.5, 0.25]))  # distractors: their own offsets
    s, persons = identity_scores(store, gallery, probes, [d], metric="cosine", template="best")
    assert persons.tolist() == [0, 1, -1, -1]
    np.testing.assert_allclose(s[:, 2:], [[1 - 0.1 - 0.5, c45 - 0.1 - 0.25], [-c45 - 0.5, -0.25]], atol=1e-12)


def test_reference_exact_k_and_curve_sizes():
    """k = floor(f n) in integers: 0.57 * 100 is 56.99999999999999 in floats, k is 57."""
    assert math.floor(0.57 * 100) == 56 and fpir_k(0.57, 100) == 57
    assert [fpir_k("0.001", n) for n in (999, 1000, 1999, 2000)] == [0, 1, 1, 2]
    assert fpir_k("0.1", 30) == 3 and fpir_k("0.01", 7) == 0
    assert curve_sizes(517) == [517] and curve_sizes(1311) == [1000, 1311] and curve_sizes(1000) == [1000]
    assert curve_sizes(10001) == [1000, 10000, 10001] and curve_sizes(0) == []
