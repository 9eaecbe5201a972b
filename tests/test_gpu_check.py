"""The GPU check script runs here on the CPU with small sizes (on a GPU machine it runs the real sizes)."""

import json

from benchmarks.gpu_check import main


def test_gpu_check_runs_small_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("LFW_ROOT", raising=False)
    result = main(["--small", "--no-embed", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["check"]["same_counts"] and saved["check"]["same_binning"]
    assert saved["check"]["auc_difference"] <= saved["check"]["auc_error_bound"]
    assert [(r["n"], r["d"]) for r in result["scoring"]] == [(600, 64), (2000, 32)]
    assert all(r["pairs"] == r["n"] * (r["n"] - 1) // 2 and r["floor_seconds"] > 0 for r in result["scoring"])
    assert "| 2000 x 32 |" in (tmp_path / "gpu_check.md").read_text()
