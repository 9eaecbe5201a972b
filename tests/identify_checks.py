"""Shared pieces of the identify tests: running the CLI, the test stores, reading results and comparing them
with the brute-force reference (`tests/identify_reference.py`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

from cli import main
from tests.identify_reference import (
    FARS,
    FPIRS,
    to_units,
    trial_figures,
)

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
    """`--distractors A B`: one option, several stores (the option may also be repeated)."""
    paths = list(paths)
    return ["--distractors", *paths] if paths else []


def identify(store: Path, out: Path, *args) -> Path:
    code, text, _ = run_cli("identify", store, "--out", out, *args)
    assert code == 0, text
    return out


def add_offsets(path: Path, seed: int, spread=(-0.1, 0.3)) -> np.ndarray:
    o = np.random.default_rng(seed).uniform(*spread, size=h5py.File(path, "r")["embeddings"].shape[0])
    with h5py.File(path, "a") as f:
        f.create_dataset("score_offsets", data=o.astype(np.float32))
    return o.astype(np.float32)


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


def check_error(args: list, *needles: str) -> str:
    code, text, err = run_cli("identify", *args)
    assert code == 2, (args, code, text)
    assert "Traceback" not in text, text
    lines = [line for line in (err or text).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, lines
    assert any(n in errors[0] for n in needles), (errors[0], needles)
    return errors[0]
