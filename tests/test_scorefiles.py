"""Score files in and out (`score --scores FILE --format F`, `score --export`): round trips through a store's
listed pairs, every format against scikit-learn, malformed lines named across read blocks, `.gz`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from cli import main
from pipeline.errors import PipelineError
from pipeline.scoring import scorefiles
from pipeline.scoring.scorefiles import read_score_file
from tests.stores import write_store


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (getattr(r, "stderr", "") or "")


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture
def pairs_store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(150), 3)[:437]
    x = (0.8 * rng.standard_normal((150, 24))[labels] + rng.standard_normal((437, 24))).astype(np.float32)
    i, j = rng.integers(0, 437, size=(2, 1777))
    keep = i != j
    pairs = np.c_[i[keep], j[keep]]
    return write_store(
        tmp_path / "p.h5", x, labels, pairs, (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
    )


@pytest.mark.parametrize("metric, export", [("cosine", "bob4"), ("l2", "csv")])
def test_export_and_read_back_give_the_same_figures(pairs_store, tmp_path, metric, export):
    code, text = run("score", pairs_store, "--pairs", "--metric", metric, "--export", export, "--out", tmp_path / "s")
    assert code == 0, text
    exported = tmp_path / "s" / f"scores.{export}"
    code, text = run("score", "--scores", exported, "--format", export, "--out", tmp_path / "f")
    assert code == 0, text
    a, b = metrics(tmp_path / "s"), metrics(tmp_path / "f")
    assert b["mode"] == "scores" and b["n_pairs"] == a["n_pairs"] and b["n_positive"] == a["n_positive"]
    for k in ("auc", "eer"):
        assert b[k] == pytest.approx(a[k], abs=1e-9)
    for f, v in a["tar_at_far"].items():
        assert b["tar_at_far"][f] == pytest.approx(v, abs=1e-9)


def _random_scores(n: int = 3001, seed: int = 1) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    values = rng.normal(0, 1, n) + 1.5 * same
    a = [f"id{k}" for k in rng.integers(0, 200, n)]  # ids; the values are written by repr of Python floats
    b = [x if s else f"id{k}x" for x, s, k in zip(a, same, rng.integers(0, 200, n), strict=True)]
    return values, same, a, b


def test_every_format_against_sklearn(tmp_path):
    values, same, a, b = _random_scores()
    exact = roc_auc_score(same, values)
    v_ = values.tolist()
    files = {
        "bob4": "# claimed real label score\n"
        + "".join(f"{x} {y} p{k} {v!r}\n" for k, (x, y, v) in enumerate(zip(a, b, v_, strict=True))),  # fmt: skip
        "bob5": "".join(f"{x} m {y}\tp {v!r}\n\n" for x, y, v in zip(a, b, v_, strict=True)),
        "bobcsv": "bio_ref_subject_id,probe_subject_id,score,note\n"
        + "".join(f'{x},{y},{v!r},"a, quoted note"\n' for x, y, v in zip(a, b, v_, strict=True)),
        "csv": "same,score\n" + "".join(f"{'true' if s else 'False'},{v!r}\n" for s, v in zip(same, v_, strict=True)),
    }
    for fmt, text in files.items():
        path = tmp_path / f"s.{fmt}"
        path.write_text(text)
        sf = read_score_file(path, fmt)
        np.testing.assert_array_equal(sf.values, values)
        np.testing.assert_array_equal(sf.same, same)
        code, out = run("score", "--scores", path, "--format", fmt, "--out", tmp_path / fmt)
        assert code == 0, out
        assert metrics(tmp_path / fmt)["auc"] == pytest.approx(exact, abs=1e-12)
    gen, imp = tmp_path / "gen.txt", tmp_path / "imp.txt"
    gen.write_text("".join(f"{v!r}\n" for v in values[same].tolist()))
    imp.write_text("".join(f"x y {v!r}\n" for v in values[~same].tolist()))
    code, out = run("score", "--scores", gen, "--impostor-scores", imp, "--format", "pyeer", "--out", tmp_path / "py")
    assert code == 0, out
    assert metrics(tmp_path / "py")["auc"] == pytest.approx(exact, abs=1e-12)


def test_gz_and_blocks_and_line_numbers(tmp_path, monkeypatch):
    """Small read blocks (lines cut across them): the same scores; a bad line far in is named by its number."""
    values, same, a, b = _random_scores(5000, seed=2)
    lines = [f"{x} {y} t {v!r}\n" for x, y, v in zip(a, b, values.tolist(), strict=True)]
    plain = tmp_path / "s.bob4"
    plain.write_text("".join(lines))
    packed = tmp_path / "s.bob4.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    monkeypatch.setattr(scorefiles, "BLOCK_BYTES", 997)
    monkeypatch.setattr(scorefiles.blocks, "__defaults__", (997,))
    for path in (plain, packed):
        np.testing.assert_array_equal(read_score_file(path, "bob4").values, values)
    for k, bad in ((4321, "a b t 0.5x\n"), (3333, "a b 0.5\n"), (17, "a b c d 0.5\n"), (4999, "a b t nan\n")):
        broken = lines.copy()
        broken[k - 1] = bad
        path = tmp_path / f"bad{k}.bob4"
        path.write_text("".join(broken))
        with pytest.raises(PipelineError, match=f"line {k}:"):
            read_score_file(path, "bob4")


def test_bad_inputs_are_one_line(tmp_path, pairs_store):
    empty = tmp_path / "empty.bob4"
    empty.write_text("# nothing\n")
    no_same = tmp_path / "x.csv"
    no_same.write_text("score\n0.5\n")
    bad_flag = tmp_path / "y.csv"
    bad_flag.write_text("same,score\n1,0.5\nmaybe,0.2\n")
    for args, needle in (
        (["--scores", empty], "holds no scores"),
        (["--scores", no_same, "--format", "csv"], "no same column"),
        (["--scores", bad_flag, "--format", "csv"], "line 3"),
        (["--scores", tmp_path / "missing.bob4"], "missing.bob4"),
        (["--scores", empty, "--format", "pyeer"], "--impostor-scores"),
        ([pairs_store, "--all-pairs", "--export", "bob4"], "histogram"),
    ):
        code, text = run("score", *args, "--out", tmp_path / "o")
        assert code == 2 and needle in text and "Traceback" not in text, (args, text)
    code, text = run("score", pairs_store, "--scores", empty, "--out", tmp_path / "o")
    assert code == 2 and "replaces STORE" in text


def _bob4(path: Path, values, a, b) -> Path:
    path.write_text("".join(f"{x} {y} t {v!r}\n" for x, y, v in zip(a, b, values.tolist(), strict=True)))
    return path


def test_identities_give_jackknife_intervals_independent_of_line_order(tmp_path):
    """With identities the intervals are the jackknife's over hashed identity groups: the same for the lines in
    any order, around the exact figures; without them (pyeer) the pair bootstrap."""
    values, same, a, b = _random_scores(4000, seed=3)
    values = np.round(values, 3)  # ties
    order = np.random.default_rng(0).permutation(len(values))
    one = _bob4(tmp_path / "one.bob4", values, a, b)
    two = _bob4(tmp_path / "two.bob4", values[order], [a[k] for k in order], [b[k] for k in order])
    results = []
    for path in (one, two):
        code, text = run("score", "--scores", path, "--out", tmp_path / path.stem)
        assert code == 0, text
        results.append(metrics(tmp_path / path.stem))
    m = results[0]
    assert "jackknife" in m["ci_method"] and "hashed" in m["ci_method"]
    for k in ("auc", "eer", "auc_ci95", "eer_ci95", "tar_at_far", "tar_at_far_ci95"):
        assert results[1][k] == m[k], k
    assert m["auc"] == pytest.approx(roc_auc_score(same, values), abs=1e-12)
    assert m["auc_ci95"][0] < m["auc"] < m["auc_ci95"][1] and m["eer_ci95"][0] < m["eer"] < m["eer_ci95"][1]
    gen, imp = tmp_path / "g.txt", tmp_path / "i.txt"
    gen.write_text("".join(f"{v!r}\n" for v in values[same].tolist()))
    imp.write_text("".join(f"x {v!r}\n" for v in values[~same].tolist()))
    code, text = run("score", "--scores", gen, "--impostor-scores", imp, "--format", "pyeer", "--out", tmp_path / "p")
    assert code == 0, text
    p = metrics(tmp_path / "p")
    assert "bootstrap" in p["ci_method"] and p["auc"] == m["auc"] and p["tar_at_far"] == m["tar_at_far"]


def test_beyond_memory_the_histogram_and_exact_tail(tmp_path):
    """Above `exact_max` scores the file is read twice into the histogram and the exact tail (as all pairs are):
    AUC within its bound of the exact one, TAR at low FAR exact, the jackknife's intervals still there."""
    from pipeline.metrics.intervals import GROUPS
    from pipeline.scoring.file_metrics import file_metrics
    from pipeline.scoring.scorefiles import read_blocks

    values, same, a, b = _random_scores(20000, seed=4)
    path = _bob4(tmp_path / "s.bob4", values, a, b)
    read = lambda: read_blocks(path, "bob4", groups=GROUPS)  # noqa: E731
    _, exact, extra = file_metrics(read, str(path), bins=2048, seed=0)
    acc, streamed, extra2 = file_metrics(read, str(path), bins=2048, seed=0, exact_max=1000)
    assert extra["scores_held"] and not extra2["scores_held"]
    assert exact["auc_error_bound"] == 0 and abs(streamed["auc"] - exact["auc"]) <= streamed["auc_error_bound"]
    for f in ("0.0001", "0.001"):
        assert streamed["tar_at_far"][f] == exact["tar_at_far"][f], f
    assert streamed["tail_exact_far"] >= 1e-3 and streamed["auc_ci95"] is not None
    assert (acc.n_positive, acc.n_negative) == (same.sum(), (~same).sum())


def test_csv_quotes_crlf_and_lines_across_blocks(tmp_path, monkeypatch):
    """CSV parsed in blocks: CRLF line ends and quoted commas read; a flag or a score that is wrong is named by
    its line in any block; a quoted field over two lines is refused, never misread."""
    monkeypatch.setattr(scorefiles.blocks, "__defaults__", (301,))
    values, same, a, b = _random_scores(700, seed=5)
    lines = ["a,b,same,score\r\n"] + [
        f'"{x}, Jr",{y},{"TRUE" if s else 0},{v!r}\r\n' for x, y, s, v in zip(a, b, same, values.tolist(), strict=True)
    ]
    path = tmp_path / "s.csv"
    path.write_text("".join(lines), newline="")
    sf = read_score_file(path, "csv", groups=10)
    np.testing.assert_array_equal(sf.values, values)
    np.testing.assert_array_equal(sf.same, same)
    for k, bad, needle in ((500, "x,y,maybe,0.5\r\n", "same must be"), (613, "x,y,1,abc\r\n", "finite score"),
                           (77, 'x,"y\r\n', "runs over lines")):  # fmt: skip
        broken = lines.copy()
        broken[k - 1] = bad
        path.write_text("".join(broken), newline="")
        with pytest.raises(PipelineError, match=f"line {k}: .*{needle}"):
            read_score_file(path, "csv")
