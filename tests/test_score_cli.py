"""`cli.py score` end to end on small generated stores: results folder, --overwrite, and one `error:` line (exit
2) for each bad input."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from cli import main
from tests.stores import random_store, write_store


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if hasattr(r, "stderr") else "")


def test_cli_score_and_overwrite(tmp_path):
    path, _, _ = random_store(tmp_path / "s.h5", n=80, d=8, seed=9)
    out = tmp_path / "res"
    code, text = run_cli("score", path, "--all-pairs", "--out", out, "--block", 33, "--no-progress", "--log-fpr")
    assert code == 0, text
    assert "AUC" in text and (out / "metrics.json").is_file()
    code, text = run_cli("score", path, "--all-pairs", "--out", out)
    assert code == 2 and "exists" in text and "--overwrite" in text
    code, text = run_cli(
        "score", path, "--all-pairs", "--out", out, "--overwrite", "--metric", "cosine", "--no-progress"
    )
    assert code == 0, text
    assert json.loads((out / "metrics.json").read_text())["metric"] == "cosine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res")]  # no temp folders left
    code, text = run_cli("score", path, "--out", tmp_path / "r2")
    assert code != 0 and "--all-pairs or --pairs" in text


def _bad(tmp_path, name, x, labels, **kw):
    return write_store(tmp_path / f"{name}.h5", np.asarray(x, np.float32), labels, **kw)


def test_cli_bad_inputs(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    lab = np.arange(20) // 2
    cases = {
        "no labels": (_bad(tmp_path, "nolabels", x, None), "--all-pairs", "no /labels"),
        "one row": (_bad(tmp_path, "one", x[:1], lab[:1]), "--all-pairs", "at least two"),
        "no same pair": (_bad(tmp_path, "nosame", x, np.arange(20)), "--all-pairs", "no same-person pair"),
        "no different pair": (
            _bad(tmp_path, "nodiff", x, np.zeros(20, int)),
            "--all-pairs",
            "no different-person pair",
        ),
        "no pairs": (_bad(tmp_path, "nopairs", x, lab), "--pairs", "holds no pairs"),
    }
    xn = x.copy()
    xn[3, 1], xn[17, 0] = np.nan, np.inf
    cases["nan rows"] = (_bad(tmp_path, "nan", xn, lab), "--all-pairs", "rows 3, 17")
    xz = x.copy()
    xz[5] = 0
    cases["zero row cosine"] = (_bad(tmp_path, "zero", xz, lab), "--all-pairs", "all zeros")
    for name, (path, mode, message) in cases.items():
        extra = ["--metric", "cosine"] if name == "zero row cosine" else []
        code, text = run_cli("score", path, mode, "--out", tmp_path / "out", "--no-progress", *extra)
        assert code == 2, (name, text)
        assert message in text, (name, text)
        assert "Traceback" not in text
        assert "undefined" in text or name not in ("no same pair", "no different pair")
    assert not (tmp_path / "out").exists()
    code, text = run_cli("score", tmp_path / "missing.h5", "--all-pairs", "--out", tmp_path / "out")
    assert code == 2 and "does not exist" in text
