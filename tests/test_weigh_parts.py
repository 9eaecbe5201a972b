"""The benchmark that weighs the best preset's parts on validation runs end to end on the tiny set: two trainings,
four comparisons, each row the `compare` of the folders it names, every side embedded by `embed`."""

import json

from click.testing import CliRunner

from benchmarks.weigh_parts import command, row, weighed


def test_weigh_parts_prints_each_part_as_compare_weighs_it(tiny_lfw, tmp_path):
    settings = dict(phase1_epochs=1, batch_size=8, lr=0.05, val_fraction=0.4, val_per_person=3, bf16=False,
                    members=2, cohort_top=2, workers=0)  # fmt: skip
    args = ["--data-root", str(tiny_lfw), "--weights", "none", "--out", str(tmp_path)]
    args += [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, repr(result.exception) + result.output[-2000:]
    rows = [line for line in result.output.splitlines() if line.startswith("| ") and ": " in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| cohort normalisation", "| ensemble of members", "| test-time scales", "| learned pooling"
    ]  # fmt: skip
    with_cohort = json.loads((tmp_path / "preset.validation-embedded" / "metrics.json").read_text())["auc"]
    without = json.loads((tmp_path / "preset.validation-no-cohort" / "metrics.json").read_text())["auc"]
    assert rows[0].split(" | ")[1].startswith(f"{without:.4f} -> {with_cohort:.4f}")
    again = weighed(tmp_path / "preset.member0.validation", tmp_path / "preset.validation-no-cohort")
    assert rows[1] == row("ensemble of members", again)
    for name in (
        "avgpool.validation-embedded",
        "preset.validation-scales",
        "preset.member0.validation",
    ):  # scales added
        assert (tmp_path / name / "metrics.json").is_file()
