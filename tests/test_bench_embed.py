"""The embed benchmark runs end to end (on the tiny set) and prints its table."""

from click.testing import CliRunner

from cli import main


def test_bench_embed_prints_table(tiny_lfw):
    args = [
        "bench",
        "embed",
        "--data-root",
        str(tiny_lfw),
        "--models",
        "squeezenet1_0",
        "--batch-size",
        "4",
        "--decoded",
        "8",
        "--workers",
        "0",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    row = [line for line in result.output.splitlines() if line.startswith("| squeezenet1_0")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "cpu" and cells[2] == "10" and 0 < float(cells[-1]) < 10
