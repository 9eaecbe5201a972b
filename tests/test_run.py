"""`run` end to end on a tiny generated LFW with a random-init SqueezeNet, and its reuse of finished steps."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli import main


def test_run_end_to_end_and_reuse(tiny_lfw, tmp_path):
    out = tmp_path / "study"
    args = [
        "run",
        "--data-root",
        str(tiny_lfw),
        "--model",
        "squeezenet1_0",
        "--weights",
        "none",
        "--recipe",
        "study",
        "--out",
        str(out),
        "--phase1-epochs",
        "1",
        "--phase2-epochs",
        "1",
        "--max-pairs",
        "4",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    peaks = summary["peak_rss_mib"]  # the peak so far after each step: it never falls
    assert list(peaks) == ["finetune", "embed", "score"] and 0 < peaks["finetune"] <= peaks["embed"] <= peaks["score"]
    for protocol in ("pairs", "people"):
        assert set(summary[protocol]) == {"pretrained", "finetuned"}
        assert all(0 <= v <= 1 for v in summary[protocol].values())
        for variant in ("pretrained", "finetuned"):
            metrics = json.loads((out / "results" / f"{variant}-{protocol}" / "metrics.json").read_text())
            assert metrics["variant"] == variant and metrics["metric"] == "l2"
        assert (out / protocol / "roc.png").is_file()
    people = json.loads((out / "results" / "finetuned-people" / "metrics.json").read_text())
    assert people["n_pairs"] == 10 * 9 // 2  # all pairs of the 10 test images
    table = (out / "table.md").read_text()
    study, _, paired = table.partition("\n## Paired comparisons\n")
    assert "improvement" in study and study.count("\n") == 3
    assert paired.count("| AUC |") == 2  # each protocol's fine-tuned result against its pretrained one
    assert (out / "roc.png").is_file() and (out / "finetune" / "model.log").is_file()

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == stamp
    again_summary = json.loads((out / "summary.json").read_text())
    assert again_summary["pairs"] == summary["pairs"] and again_summary["seconds"] == summary["seconds"]

    changed = CliRunner().invoke(main, [*args, "--lr", "0.5"])
    assert changed.exit_code == 2 and "another configuration" in changed.output


def test_run_best_recipe_embeds_with_its_pooling_and_flip(tiny_lfw, tmp_path):
    import h5py

    out = tmp_path / "best"
    args = ["run", "--data-root", str(tiny_lfw), "--weights", "none", "--recipe", "best", "--out", str(out)]
    args += ["--phase1-epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for protocol in ("pairs", "people"):
        with h5py.File(out / "embeddings" / f"finetuned-{protocol}.h5", "r") as f:
            assert f.attrs["tta_flip"] and f.attrs["shared_pass"] and f.attrs["layer"] == "penultimate"
            assert "tta_resizes" not in json.loads(f.attrs["transform"])  # the recipe has no test-time scales
        with h5py.File(out / "embeddings" / f"pretrained-{protocol}.h5", "r") as f:
            assert "tta_flip" not in f.attrs and "tta_resizes" not in json.loads(f.attrs["transform"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune"]["config"]["pool"] == "learned" and summary["metric"] == "cosine"
    assert any(k.startswith("embed ") for k in summary["seconds"]) and summary["tta_resizes"] == []
    # other test-time scales: the fine-tuned stores are embedded again, the checkpoint and pretrained ones kept
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    ckpt = (out / "finetune" / "model.pt").stat().st_mtime_ns
    result = CliRunner().invoke(main, [*args, "--tta-resizes", "240,272"])
    assert result.exit_code == 0, result.output
    now = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert {k for k in now if now[k] != stamp[k]} == {"finetuned-pairs.h5", "finetuned-people.h5"}
    assert (out / "finetune" / "model.pt").stat().st_mtime_ns == ckpt
    with h5py.File(out / "embeddings" / "finetuned-people.h5", "r") as f:
        assert json.loads(f.attrs["transform"])["tta_resizes"] == [240, 272]
    assert json.loads((out / "summary.json").read_text())["tta_resizes"] == [240, 272]
