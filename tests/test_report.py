"""Results folders and `report`: files, atomic replacement, the combined figure and the study's table."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.errors import PipelineError
from pipeline.report import read_result, report, study_table
from pipeline.roc import HistogramROC
from pipeline.score import ScoreConfig, score
from tests.stores import random_store, write_store


def _result(tmp_path, name, signal, variant, protocol="people", metric="l2"):
    path, _, _ = random_store(tmp_path / f"{name}.h5", n=90, d=8, n_ids=30, seed=int(signal * 10), signal=signal)
    with __import__("h5py").File(path, "a") as f:
        f.attrs.update(model="alexnet", protocol=protocol, image_set="deepfunneled")
    out = tmp_path / name
    score(ScoreConfig(store=path, out=out, variant=variant, metric=metric, progress=False))
    return out


def test_results_folder_files(tmp_path):
    out = _result(tmp_path, "pre", 0.5, "pretrained")
    metrics, fpr, tpr = read_result(out)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    with open(out / "roc.csv") as f:
        assert next(csv.reader(f)) == ["fpr", "tpr", "threshold", "threshold_normalised"]
    acc = HistogramROC.load(out / "histogram.npz")
    assert acc.compute()["auc"] == pytest.approx(metrics["auc"], abs=1e-15)
    assert acc.n_positive == metrics["n_positive"]
    assert (out / "roc.png").stat().st_size > 10_000
    assert metrics["variant"] == "pretrained" and metrics["protocol"] == "people"


def test_report_table_and_figure(tmp_path):
    dirs = [
        _result(tmp_path, "pre", 0.3, "pretrained"),
        _result(tmp_path, "fine", 1.0, "finetuned"),
        _result(tmp_path, "pairs_pre", 0.3, "pretrained", protocol="pairs"),
    ]
    table = report(dirs, tmp_path / "rep", log_fpr=True)
    assert (tmp_path / "rep" / "roc.png").is_file() and (tmp_path / "rep" / "table.md").read_text() == table
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | LFWPeople pretrained | LFWPeople fine-tuned | LFWPeople improvement")
    assert "LFWPairs pretrained" in lines[0]
    pre = json.loads((dirs[0] / "metrics.json").read_text())["auc"]
    fine = json.loads((dirs[1] / "metrics.json").read_text())["auc"]
    row = lines[2].split("|")
    assert row[1].strip() == "alexnet (deepfunneled)"
    assert row[2].strip() == f"{pre:.4f}" and row[3].strip() == f"{fine:.4f}" and row[4].strip() == f"{fine - pre:+.4f}"
    assert row[7].strip() == "-"  # no fine-tuned LFWPairs result


def test_study_table_layout():
    t = study_table(
        [
            {"model": "vgg16", "protocol": "pairs", "variant": "pretrained", "auc": 0.7421},
            {"model": "vgg16", "protocol": "pairs", "variant": "finetuned", "auc": 0.8572},
        ]
    )
    assert t.splitlines()[2] == "| vgg16 | 0.7421 | 0.8572 | +0.1151 |"


def test_report_cli_and_errors(tmp_path):
    d = _result(tmp_path, "pre", 0.5, "pretrained", metric="cosine")
    r = CliRunner().invoke(main, ["report", str(d), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "| model |" in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "not a results folder" in r.output
    with pytest.raises(PipelineError):
        report([], tmp_path / "rep")


def test_listed_pairs_folder(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [1, 2]])
    path = write_store(tmp_path / "p.h5", x, np.arange(10) // 2, pairs, np.array([1, 1, 1, 1, 1, 0]), protocol="pairs")
    out = tmp_path / "res"
    score(ScoreConfig(store=path, all_pairs=False, out=out, progress=False))
    metrics, _, _ = read_result(out)
    assert metrics["mode"] == "pairs" and metrics["n_pairs"] == 6 and metrics["protocol"] == "pairs"
