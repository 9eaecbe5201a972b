"""The GPU check script runs here on the CPU with small sizes (on a GPU machine it runs the real sizes)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu_check import main
from benchmarks.lfw_slice import make_slice
from pipeline.errors import PipelineError
from pipeline.faces import lfw
from tests.conftest import ROOT


def test_gpu_check_runs_small_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("LFW_ROOT", raising=False)
    result = main(["--small", "--no-embed", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["check"]["same_counts"] and saved["check"]["same_binning"]
    assert saved["check"]["auc_difference"] <= saved["check"]["auc_error_bound"]
    assert [(r["n"], r["d"]) for r in result["scoring"]] == [(600, 64), (2000, 32)]
    assert all(r["pairs"] == r["n"] * (r["n"] - 1) // 2 and r["floor_seconds"] > 0 for r in result["scoring"])
    assert "| 2000 x 32 |" in (tmp_path / "gpu_check.md").read_text()


def test_lfw_slice_holds_the_split_and_every_protocol_file(tiny_lfw, tmp_path):
    out = tmp_path / "slice"
    assert make_slice(tiny_lfw, out) == 10
    full = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")
    part = lfw.load_protocol(out, "deepfunneled", "people", "test")
    assert part.paths == full.paths and part.labels.tolist() == full.labels.tolist()
    assert sorted(p.name for p in (out / "lfw-py").glob("*.txt")) == sorted(
        p.name for p in (tiny_lfw / "lfw-py").glob("*.txt")
    )
    with pytest.raises(PipelineError, match="missing"):  # the train images stayed behind
        lfw.load_protocol(out, "deepfunneled", "people", "train")
    assert make_slice(tiny_lfw, out) == 10  # again: files already there are kept


def test_device_run_script_runs_without_a_gpu(tiny_lfw, tmp_path):
    make_slice(tiny_lfw, tmp_path / "slice")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "LFW_ROOT": str(tmp_path / "slice")}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"nvidia-smi.txt", "pytest.log", "gpu_check.log", "gpu_check.json", "gpu_check.md"}
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["embedding"][0]["images"] == 10 and saved["embedding"][0]["embed_rate"] > 0
