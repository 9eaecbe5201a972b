"""`cli.py identify` (open-set 1:N identification, docs/identification.md) against the brute-force float64
reference `tests/identify_reference.py` on awkward sizes (1,237 rows, D = 37, 517 distractors over two stores, one
float16): CMC, FNIR at FPIR, DIR at FAR per trial and averaged, every search of searches.csv, the distractor curve,
both metrics, both templates, two gallery images, score offsets, --split round trip, --rows parts merged, the
trials of split.csv, one `error:` line (exit 2) for each bad input, and the real LFW test store when
LFW_PEOPLE_STORE names it. The reference itself is checked on hand-worked examples first (no project code).

float32 scores may order two scores closer than ~1e-6 either way: outcomes must agree exactly except for
searches the reference marks as near-ties (`NEAR`, relative), and each figure within the reference's `slack`."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from tests.identify_reference import (
    FARS,
    FPIRS,
    NEAR,
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
from tests.stores import random_store, write_store

D = 37
IGNORED = {"config", "provenance", "store", "parts", "world_size", "n_tiles", "label", "backend", "ranges"}
"""metrics.json keys that describe a run rather than its result (and every key starting with `seconds`); `merge`
adds `parts` and `ranges` (the gallery spans it joined, as `score`'s merge does)."""


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout and stderr, stderr alone)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    err = r.stderr if hasattr(r, "stderr") else ""
    return r.exit_code, r.output + err + ("" if r.exception is None else repr(r.exception)), err


def distractor_args(paths) -> list:
    """`--distractors A B` (one option, several stores, as docs/identification.md writes it) or, when the option
    is click's `multiple`, `--distractors A --distractors B`."""
    paths = list(paths)
    if not paths:
        return []
    command = main.get_command(None, "identify")
    option = next(p for p in command.params if "--distractors" in p.opts)
    if getattr(option, "multiple", False):
        return [a for p in paths for a in ("--distractors", p)]
    return ["--distractors", *paths]


def identify(store: Path, out: Path, *args) -> Path:
    code, text, _ = run_cli("identify", store, "--out", out, *args)
    assert code == 0, text
    return out


def add_offsets(path: Path, seed: int, spread=(-0.1, 0.3)) -> np.ndarray:
    o = np.random.default_rng(seed).uniform(*spread, size=h5py.File(path, "r")["embeddings"].shape[0])
    with h5py.File(path, "a") as f:
        f.create_dataset("score_offsets", data=o.astype(np.float32))
    return o.astype(np.float32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """The main store (1,237 rows, 400 people, D = 37), the same rows with score offsets, two distractor stores
    (300 float32 rows with offsets in `d1o`, without in `d1`; 217 float16 rows) and two larger ones for the
    distractor curve (700 + 611 = 1,311 rows, the second float16)."""
    root = tmp_path_factory.mktemp("stores")
    main_path, x, labels = random_store(root / "main.h5", n=1237, d=D, n_ids=400, seed=1, signal=0.8)
    offsets = write_store(root / "offsets.h5", x, labels)
    add_offsets(offsets, 11)
    d1, dx, dl = random_store(root / "d1.h5", n=300, d=D, n_ids=90, seed=2, signal=0.8)
    d1o = write_store(root / "d1o.h5", dx, dl)
    add_offsets(d1o, 12)
    d2, _, _ = random_store(root / "d2.h5", n=217, d=D, seed=3, signal=0.8, dtype="float16")
    c1, _, _ = random_store(root / "c1.h5", n=700, d=D, seed=4, signal=0.8)
    c2, _, _ = random_store(root / "c2.h5", n=611, d=D, seed=5, signal=0.8, dtype="float16")
    return dict(main=main_path, offsets=offsets, d1=d1, d1o=d1o, d2=d2, c1=c1, c2=c2)


# ---------------------------------------------------------------------------------------------------------------
# Reading the results


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _number(text: str) -> float:
    return math.nan if text.strip().lower() in ("", "nan", "none", "null") else float(text)


def read_searches(path: Path) -> dict[tuple[int, int], tuple[str, float, int | None, float]]:
    """searches.csv -> {(trial, row): (role, mate_score, mate_rank or None, top_nonmate_score)}."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["trial", "row", "role", "mate_score", "mate_rank", "top_nonmate_score"]
        for r in reader:
            key = (int(r["trial"]), int(r["row"]))
            assert key not in out, f"search {key} listed twice"
            rank = _number(r["mate_rank"])
            out[key] = (r["role"], _number(r["mate_score"]), None if math.isnan(rank) else int(rank),
                        _number(r["top_nonmate_score"]))  # fmt: skip
    return out


def trials_of(m: dict, ref: dict) -> list[tuple[dict, dict]]:
    """The implementation's per-trial figures beside the reference's, matched by trial number (or position)."""
    got = m["trials"]
    assert len(got) == len(ref["trials"])
    if all(isinstance(t, dict) and "trial" in t for t in got):
        by = {int(t["trial"]): t for t in got}
        return [(by[r["trial"]], r) for r in ref["trials"]]
    return list(zip(got, ref["trials"], strict=True))


def float32_close(got: float, want: float) -> bool:
    """Equal to float32 precision (relative 1e-5, with a floor of 1 for the scale)."""
    return abs(got - want) <= 1e-5 * max(1.0, abs(want))


def check_figures(got: dict, want: dict, slack: dict, where: str) -> None:
    """cmc, fnir_at_fpir and dir_at_far of one trial (or averaged) within `slack` (keys `cmc` and the levels)."""
    assert len(got["cmc"]) == len(want["cmc"]), where
    for k, (g, w) in enumerate(zip(got["cmc"], want["cmc"], strict=True), 1):
        assert abs(g - w) <= slack["cmc"] + 1e-9, f"{where}: CMC({k}) {g} != {w} (slack {slack['cmc']})"
    for f in FPIRS:
        g, w = got["fnir_at_fpir"][f], want["fnir_at_fpir"][f]
        assert abs(g - w) <= slack[f] + 1e-9, f"{where}: FNIR at FPIR {f}: {g} != {w} (slack {slack[f]})"
    for f in FARS:
        g, w = got["dir_at_far"][f], want["dir_at_far"][f]
        assert abs(g - w) <= slack[f] + 1e-9, f"{where}: DIR at FAR {f}: {g} != {w} (slack {slack[f]})"


def check_searches(out: Path, ref: dict, max_differing: float = 0.0) -> dict[int, int]:
    """Every search of searches.csv against the reference: the same searches and roles, mate and top non-mate
    scores to float32 precision, mate_rank (R+1 beyond R) exactly except near-ties; at most `max_differing` (a
    fraction) of the searches may differ, and only near-ties. Returns how many differ per trial."""
    metric, r_max = ref["metric"], ref["max_rank"]
    got = read_searches(out / "searches.csv")
    want = {}
    for t in ref["trials"]:
        s = t["searches"]
        for i, row in enumerate(s.rows):
            want[(t["trial"], int(row))] = i, s
    assert set(got) == set(want), f"searches differ: {sorted(set(got) ^ set(want))[:5]}"
    differing, bad, per_trial = 0, [], {t["trial"]: 0 for t in ref["trials"]}
    for key, (i, s) in want.items():
        role, mate, rank, top = got[key]
        assert role == ("mated" if s.mated[i] else "nonmated"), (key, role)
        assert float32_close(top, to_units(s.top[i], metric)), (key, "top_nonmate_score", top, s.top[i])
        if not s.mated[i]:
            assert math.isnan(mate) and rank is None, (key, mate, rank)
            continue
        assert float32_close(mate, to_units(s.mate[i], metric)), (key, "mate_score", mate, s.mate[i])
        if rank != min(int(s.rank[i]), r_max + 1):
            differing += 1
            per_trial[key[0]] += 1
            if not s.near[i]:
                bad.append((key, rank, int(s.rank[i]), float(s.mate[i]), float(s.top[i])))
    assert not bad, f"mate_rank differs beyond near-ties (key, got, reference rank, mate, top): {bad[:5]}"
    assert differing <= max_differing * len(want), f"{differing} of {len(want)} searches differ"
    return per_trial


def check_identify(out: Path, ref: dict, template: str = "best", max_differing: float = 0.0) -> dict:
    """searches.csv, then metrics.json (per trial and averaged, distractor curve, iet) against the reference. A
    figure may differ from the reference by the searches whose mate_rank differs (near-ties) and those whose mate
    is within NEAR of the figure's threshold, as fractions of the mated searches (its slack)."""
    differing = check_searches(out, ref, max_differing)
    m = read_metrics(out)
    assert m["mode"] == "identify" and m["metric"] == ref["metric"] and m["template"] == template
    assert m["max_rank"] == ref["max_rank"] and m["n_distractors"] == ref["n_distractors"]
    slacks = []
    for got, want in trials_of(m, ref):
        where = f"trial {want['trial']}"
        assert (got["n_mated"], got["n_nonmated"]) == (want["n_mated"], want["n_nonmated"]), where
        flips = differing[want["trial"]] / want["n_mated"]
        slacks.append({"cmc": flips, **{f: flips + v for f, v in want["near_threshold"].items()}})
        check_figures(got, want, slacks[-1], where)
        check_thresholds(got.get("fpir_thresholds"), want["fpir_thresholds"], ref["metric"], where)
        if "distractor_curve" in want and "distractor_curve" in got:
            check_curve(got["distractor_curve"], want["distractor_curve"], where)
    check_figures(m, ref, {k: float(np.mean([s[k] for s in slacks])) for k in slacks[0]}, "averaged")
    if ref["n_distractors"]:
        check_curve(m["distractor_curve"], ref["distractor_curve"], "averaged")
    else:
        assert not m.get("distractor_curve")
    check_iet(m, ref)
    return m


def check_curve(got: list, want: list, where: str) -> None:
    """The distractor curve, each point within its own slack."""
    assert [p["distractors"] for p in got] == [p["distractors"] for p in want], (where, got)
    for g, w in zip(got, want, strict=True):
        for key in ("rank1", "fnir_at_fpir_0.01"):
            assert abs(g[key] - w[key]) <= w["slack"][key] + 1e-9, (where, key, g, w)


def check_thresholds(got, want: dict, metric: str, where: str) -> None:
    """fpir_thresholds (t_(k+1) per FPIR level, in the metric's units) where they are keyed by level."""
    if not isinstance(got, dict):
        return
    for f, g in got.items():
        if f in want:
            w = to_units(want[f], metric)
            if g is None or not math.isfinite(w):
                assert g is None and not math.isfinite(w) or g == w, (where, f, g, w)
            else:
                assert float32_close(g, w), (where, f, g, w)


def check_iet(m: dict, ref: dict) -> None:
    """iet: FNIR (rank 1) at each FPIR of its grid, averaged over trials, within the slack."""
    grid = [str(f) for f in m["iet"]["fpir"]]
    assert len(m["iet"]["fnir"]) == len(grid) and grid
    figs = [trial_figures(t["searches"], 1, fpirs=tuple(grid), fars=()) for t in ref["trials"]]
    for i, f in enumerate(grid):
        want = float(np.mean([fig["fnir_at_fpir"][f] for fig in figs]))
        slack = float(np.mean([fig["slack"][f] for fig in figs]))
        got = m["iet"]["fnir"][i]
        assert abs(got - want) <= slack + 1e-9, f"iet: FNIR at FPIR {f}: {got} != {want} (slack {slack})"


def csv_lines(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [lines[0], *sorted(lines[1:])]


def without(d, ignored=IGNORED):
    """A JSON value without the keys that describe the run (recursively)."""
    if isinstance(d, dict):
        return {k: without(v, ignored) for k, v in d.items() if k not in ignored and not k.startswith("seconds")}
    if isinstance(d, list):
        return [without(v, ignored) for v in d]
    return d


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


# ---------------------------------------------------------------------------------------------------------------
# identify against the reference

CASES = {
    # name: (store, distractors, options, reference options)
    "cosine": ("main", [], [], {}),
    "l2 distractors": ("main", ["d1", "d2"], ["--metric", "l2"], {"metric": "l2"}),
    "cosine distractors": ("main", ["d1", "d2"], ["--max-rank", 50], {"max_rank": 50}),
    "mean template": ("main", ["d1", "d2"], ["--template", "mean", "--gallery-images", 2], {"template": "mean"}),
    "two gallery images": ("main", [], ["--gallery-images", 2], {}),
    "two gallery images l2": ("main", ["d2"], ["--gallery-images", 2, "--metric", "l2"], {"metric": "l2"}),
    "offsets": ("offsets", ["d1o", "d2"], [], {}),
    "offsets mean": ("offsets", ["d1o", "d2"], ["--template", "mean", "--gallery-images", 2], {"template": "mean"}),
    "offsets off": ("offsets", ["d1o", "d2"], ["--no-score-norm"], {"score_norm": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_identify_against_reference(stores, tmp_path, case):
    name, distractors, options, ref_options = CASES[case]
    options = ["--trials", 3, "--seed", 7, "--max-rank", 20, "--gallery-people", 151, *options]
    out = identify(stores[name], tmp_path / "out", *options, *distractor_args(stores[d] for d in distractors))
    for f in ("metrics.json", "split.csv", "searches.csv", "cmc.png", "iet.png"):
        assert (out / f).is_file(), f
    ref_options = {"metric": "cosine", "max_rank": 20, **ref_options}
    ref = reference(stores[name], out / "split.csv", [stores[d] for d in distractors], **ref_options)
    assert len(ref["trials"]) == 3
    m = check_identify(out, ref, template=ref_options.get("template", "best"))
    assert len(m["cmc"]) == ref_options["max_rank"]
    assert sum(d["n_mated"] for d in ref["trials"]) > 0 and 0 < ref["cmc"][0] < 1  # neither trivial nor hopeless


def test_identify_split_round_trip(stores, tmp_path):
    """split.csv fed back with --split gives the same trials, searches and figures, which match the reference."""
    common = ["--trials", 2, "--seed", 3, *distractor_args([stores["d1"], stores["d2"]])]
    first = identify(stores["main"], tmp_path / "first", *common)
    again = identify(stores["main"], tmp_path / "again", "--split", first / "split.csv", *common)
    assert read_split(again / "split.csv").keys() == read_split(first / "split.csv").keys()
    for t, trial in read_split(first / "split.csv").items():
        other = read_split(again / "split.csv")[t]
        for role in ("gallery", "mated", "nonmated"):
            assert sorted(getattr(other, role)) == sorted(getattr(trial, role)), (t, role)
    assert csv_lines(again / "searches.csv") == csv_lines(first / "searches.csv")
    a, b = read_metrics(first), read_metrics(again)
    for key in ("cmc", "fnir_at_fpir", "dir_at_far", "distractor_curve", "iet"):
        assert a[key] == b[key], key
    assert without(a["trials"]) == without(b["trials"])
    ref = reference(stores["main"], first / "split.csv", [stores["d1"], stores["d2"]])
    check_identify(again, ref)


def test_identify_parts_merge(stores, tmp_path):
    """--rows at three spans covering the gallery (151 enrolled images, then 517 distractors: 668), merged, equal
    the whole run: metrics.json (but for the run's description) and searches.csv."""
    common = ["--trials", 2, "--seed", 5, "--gallery-people", 151, "--max-rank", 30]
    common += distractor_args([stores["d1"], stores["d2"]])
    whole = identify(stores["main"], tmp_path / "whole", *common)
    parts = [
        identify(stores["main"], tmp_path / f"p{i}", *common, "--rows", span)
        for i, span in enumerate(("0:97", "97:389", "389:668"))
    ]
    for p in parts:
        assert (p / "part.json").is_file() and (p / "search.npz").is_file()
    code, text, _ = run_cli("merge", *parts, "--out", tmp_path / "merged")
    assert code == 0, text
    merged = tmp_path / "merged"
    a, b = without(read_metrics(whole)), without(read_metrics(merged))
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        assert a[key] == b[key], key
    assert csv_lines(merged / "searches.csv") == csv_lines(whole / "searches.csv")
    assert csv_lines(merged / "split.csv") == csv_lines(whole / "split.csv")
    ref = reference(stores["main"], whole / "split.csv", [stores["d1"], stores["d2"]], max_rank=30)
    check_identify(merged, ref)


# ---------------------------------------------------------------------------------------------------------------
# The trials and the distractor curve


def eligible_people(labels: np.ndarray, k: int) -> set[int]:
    ids, counts = np.unique(labels, return_counts=True)
    return set(ids[counts >= k + 1].tolist())


def check_trials(split: Path, labels: np.ndarray, n_people: int | None, k: int) -> dict[int, Trial]:
    """Per trial: roles disjoint; K gallery images of each of N eligible people; every other image of theirs a
    mated probe (so each enrolled person has one at least), every image of everyone else a non-mated probe."""
    trials = read_split(split)
    eligible = eligible_people(labels, k)
    for t, trial in trials.items():
        g, m, n = (set(r.tolist()) for r in (trial.gallery, trial.mated, trial.nonmated))
        assert len(g) == len(trial.gallery) and len(m) == len(trial.mated) and len(n) == len(trial.nonmated)
        assert not (g & m) and not (g & n) and not (m & n), f"trial {t}: roles overlap"
        assert g | m | n == set(range(len(labels))), f"trial {t}: rows left out"
        people, counts = np.unique(labels[trial.gallery], return_counts=True)
        assert set(people.tolist()) <= eligible and (counts == k).all()
        if n_people is not None:
            assert len(people) == n_people
        enrolled = set(people.tolist())
        assert set(np.flatnonzero(np.isin(labels, list(enrolled))).tolist()) - g == m
        assert set(labels[trial.mated].tolist()) == enrolled, f"trial {t}: an enrolled person without a mated probe"
        assert not enrolled & set(labels[trial.nonmated].tolist())
    return trials


def test_identify_trials(stores, tmp_path):
    """split.csv: the protocol's trials; different trials differ; the same seed gives the same trials, another
    seed others; the default gallery is half the eligible people."""
    _, _, labels = random_store(tmp_path / "small.h5", n=311, d=D, n_ids=90, seed=8)
    small = tmp_path / "small.h5"
    a = identify(small, tmp_path / "a", "--trials", 3, "--seed", 4, "--gallery-images", 2)
    b = identify(small, tmp_path / "b", "--trials", 3, "--seed", 4, "--gallery-images", 2)
    c = identify(small, tmp_path / "c", "--trials", 3, "--seed", 5, "--gallery-images", 2, "--gallery-people", 20)
    e = len(eligible_people(labels, 2))
    trials = check_trials(a / "split.csv", labels, None, 2)
    n = len(np.unique(labels[trials[min(trials)].gallery]))
    assert n in (e // 2, (e + 1) // 2), (n, e)
    check_trials(c / "split.csv", labels, 20, 2)
    assert (a / "split.csv").read_text() == (b / "split.csv").read_text()
    assert (a / "split.csv").read_text() != (c / "split.csv").read_text()
    galleries = [sorted(t.gallery.tolist()) for t in trials.values()]
    assert len({tuple(g) for g in galleries}) == 3, "trials repeat"
    # the main store's run, K = 1
    out = identify(stores["main"], tmp_path / "main", "--trials", 2, "--gallery-people", 151)
    check_trials(out / "split.csv", h5py.File(stores["main"], "r")["labels"][...], 151, 1)


def test_identify_distractor_curve(stores, tmp_path):
    """1,311 distractors (700 + 611 float16): the curve at 1,000 and 1,311 against the reference; rank 1 never
    rises as distractors are added, in each trial and averaged."""
    out = identify(stores["main"], tmp_path / "out", "--trials", 2, "--gallery-people", 151, "--max-rank", 10,
                   *distractor_args([stores["c1"], stores["c2"]]))  # fmt: skip
    ref = reference(stores["main"], out / "split.csv", [stores["c1"], stores["c2"]], max_rank=10)
    m = check_identify(out, ref)
    curves = [m["distractor_curve"]] + [t["distractor_curve"] for t in m["trials"] if "distractor_curve" in t]
    for curve in curves:
        assert [p["distractors"] for p in curve] == [1000, 1311]
        rank1 = [p["rank1"] for p in curve]
        assert all(b <= a for a, b in zip(rank1[:-1], rank1[1:], strict=True)), rank1
    assert m["distractor_curve"][-1]["rank1"] == m["cmc"][0]
    assert m["distractor_curve"][-1]["fnir_at_fpir_0.01"] == m["fnir_at_fpir"]["0.01"]
    no_d = reference(stores["main"], out / "split.csv", max_rank=10)
    assert no_d["cmc"][0] >= ref["distractor_curve"][0]["rank1"] >= ref["cmc"][0]


def test_identify_unlabelled_distractors(stores, tmp_path):
    """A distractor store needs no /labels (a MegaFace-style set of strangers)."""
    x = np.random.default_rng(9).standard_normal((123, D)).astype(np.float32)
    bare = write_store(tmp_path / "bare.h5", x, None)
    out = identify(stores["main"], tmp_path / "out", "--trials", 1, *distractor_args([bare]), "--max-rank", 5)
    check_identify(out, reference(stores["main"], out / "split.csv", [bare], max_rank=5))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def check_error(args: list, *needles: str) -> str:
    code, text, err = run_cli("identify", *args)
    assert code == 2, (args, code, text)
    assert "Traceback" not in text, text
    lines = [line for line in (err or text).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, lines
    assert any(n in errors[0] for n in needles), (errors[0], needles)
    return errors[0]


def test_identify_bad_inputs(stores, tmp_path):
    path, _, labels = random_store(tmp_path / "s.h5", n=211, d=D, n_ids=60, seed=6)
    eligible = len(eligible_people(labels, 1))
    out = ["--out", tmp_path / "out"]
    check_error([path, *out, "--gallery-people", eligible + 1], "--gallery-people", str(eligible + 1))
    check_error([path, *out, "--template", "mean", "--metric", "l2"], "mean")
    wrong, _, _ = random_store(tmp_path / "d16.h5", n=50, d=16, seed=7)
    check_error([path, *out, *distractor_args([wrong])], "16")

    good = identify(path, tmp_path / "good", "--trials", 1)
    lines = (good / "split.csv").read_text().splitlines()
    bad_role = tmp_path / "bad_role.csv"
    bad_role.write_text("\n".join([lines[0], *lines[1:-1], lines[-1].rsplit(",", 1)[0] + ",probe"]) + "\n")
    check_error([path, *out, "--split", bad_role], "probe")
    bad_row = tmp_path / "bad_row.csv"
    t, _, role = lines[-1].split(",")
    bad_row.write_text("\n".join([*lines[:-1], f"{t},211,{role}"]) + "\n")
    check_error([path, *out, "--split", bad_row], "211")


def test_identify_l2_with_offsets_refused(stores, tmp_path):
    """As `score`: offsets go with cosine; l2 on a store with offsets needs --no-score-norm."""
    check_error([stores["offsets"], "--out", tmp_path / "out", "--metric", "l2"], "offsets", "--no-score-norm")
    identify(stores["offsets"], tmp_path / "ok", "--metric", "l2", "--no-score-norm", "--trials", 1)


# ---------------------------------------------------------------------------------------------------------------
# The real LFW test store


@pytest.mark.slow
def test_identify_real_lfw_people(tmp_path):
    """The real LFWPeople test store (finetuned, with score offsets): 400 enrolled people, 10 trials, cosine; at
    most 0.05% of the searches may differ from the reference, near-ties only."""
    path = os.environ.get("LFW_PEOPLE_STORE")
    if not path:
        pytest.skip("LFW_PEOPLE_STORE is unset (the path of a real `embed --protocol people` store)")
    if not Path(path).is_file():
        pytest.skip(f"LFW_PEOPLE_STORE={path} does not exist")
    out = identify(Path(path), tmp_path / "out", "--gallery-people", 400, "--trials", 10, "--metric", "cosine")
    ref = reference(path, out / "split.csv", metric="cosine")
    check_identify(out, ref, max_differing=0.0005)
    assert NEAR == 1e-5


@pytest.mark.slow
def test_identify_real_lfw_slice(shared_data, shared_weights, tmp_path):
    """Real images, real SqueezeNet: the first 400 peopleDevTest images embedded, 40 people enrolled, 3 trials,
    cosine and l2; identify equals the reference (near-ties aside)."""
    from pipeline.embedding.embed import EmbedConfig, embed

    store = embed(EmbedConfig(out=tmp_path / "test.h5", data_root=shared_data, protocol="people", split="test",
                              weights=str(shared_weights), layer="penultimate", limit=400, workers=0,
                              device="cpu"))  # fmt: skip
    for metric in ("cosine", "l2"):
        out = identify(store, tmp_path / metric, "--gallery-people", 40, "--trials", 3, "--metric", metric)
        check_identify(out, reference(store, out / "split.csv", metric=metric), max_differing=0.0005)
        assert read_metrics(out)["n_mated"] > 40


def test_identify_damaged_inputs_and_leftovers(stores, tmp_path):
    """NaN distractor rows, a truncated distractor store and a missing one are one error line each; what a killed
    run left (its temporary folder) goes, a foreign folder at --out is never replaced."""
    x = h5py.File(stores["d1"], "r")["embeddings"][...]
    x[17, 3] = np.nan
    nan = write_store(tmp_path / "nan.h5", x, None)
    check_error([stores["main"], "--out", tmp_path / "o1", "--distractors", nan, "--no-progress"], "NaN", "row")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(Path(stores["d1"]).read_bytes()[:2000])
    check_error([stores["main"], "--out", tmp_path / "o2", "--distractors", cut], "HDF5", "truncated")
    check_error([stores["main"], "--out", tmp_path / "o3", "--distractors", tmp_path / "none.h5"], "does not exist")
    assert not any(p.name.startswith(("o1", "o2", "o3")) for p in tmp_path.iterdir())
    left = tmp_path / ".out.123.tmp"
    left.mkdir()
    (left / "metrics.json").write_text("{}")
    identify(stores["main"], tmp_path / "out", "--trials", 1)
    assert not left.exists() and (tmp_path / "out" / "metrics.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    check_error([stores["main"], "--out", foreign, "--overwrite"], "refusing to replace")
    assert (foreign / "notes.txt").read_text() == "mine"
