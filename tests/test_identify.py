"""`cli.py identify` (open-set 1:N identification, docs/identification.md) against the brute-force float64
reference `tests/identify_reference.py` on awkward sizes (1,237 rows, D = 37, 517 distractors over two stores, one
float16): CMC, FNIR at FPIR, DIR at FAR per trial and averaged, every search of searches.csv, the distractor curve,
both metrics, both templates, two gallery images, score offsets, --split round trip, --rows parts merged, the
trials of split.csv, one `error:` line (exit 2) for each bad input, and the real LFW test store when
LFW_PEOPLE_STORE names it. The reference itself is checked on hand-worked examples first (no project code).

float32 scores may order two scores closer than ~1e-6 either way: outcomes must agree exactly except for
searches the reference marks as near-ties (`NEAR`, relative), and each figure within the reference's `slack`."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.identify_checks import (
    D,
    add_offsets,
    check_error,
    check_identify,
    csv_lines,
    distractor_args,
    identify,
    read_metrics,
    run_cli,
    without,
)
from tests.identify_reference import (
    NEAR,
    Trial,
    read_split,
    reference,
)
from tests.stores import random_store, write_store


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


def test_identify_probes_in_chunks_give_the_same(stores, tmp_path, monkeypatch):
    """The enrolled images searched for 512 probes at a time (a small `ENROLLED_BYTES`): the same result."""
    from pipeline.identify import stage

    args = ["--trials", 2, "--gallery-images", 2, *distractor_args([stores["d1"], stores["d2"]])]
    whole = identify(stores["main"], tmp_path / "whole", *args)
    monkeypatch.setattr(stage, "ENROLLED_BYTES", 4 * 512 * 50)
    chunked = identify(stores["main"], tmp_path / "chunked", *args)
    assert without(read_metrics(chunked)) == without(read_metrics(whole))
    assert csv_lines(chunked / "searches.csv") == csv_lines(whole / "searches.csv")


def test_identify_distractors_one_flag_or_repeated(stores, tmp_path):
    """`--distractors A B` and `--distractors A --distractors B` give the same result."""
    one = identify(stores["main"], tmp_path / "one", "--trials", 1, "--distractors", stores["d1"], stores["d2"])
    two = identify(stores["main"], tmp_path / "two", "--distractors", stores["d1"], "--trials", 1, "--distractors",
                   stores["d2"])  # fmt: skip
    assert read_metrics(one)["n_distractors"] == 517
    assert without(read_metrics(one)) == without(read_metrics(two))
