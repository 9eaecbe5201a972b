"""Benchmarks: each prints a table of ratios measured in one run (logs and commands: docs/scoring.md, docs/embedding.md, docs/scaling.md, docs/faults.md)."""

import importlib
from collections.abc import Callable

import click


def argparse_command(name: str, main: Callable[[list[str]], object], doc: str | None) -> click.Command:
    """A click command for `cli.py bench NAME` that hands its arguments to an argparse `main(argv)`."""

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   add_help_option=False, help=(doc or "").splitlines()[0] if doc else None)  # fmt: skip
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    def command(argv: tuple[str, ...]) -> None:
        main(list(argv))

    return command


BENCHMARKS = {
    "embed": "bench_embed",
    "score": "bench_score",
    "scale": "bench_scale",
    "faults": "faults",
    "gpu-check": "gpu_check",
    "lfw-slice": "lfw_slice",
    "exact-tail": "exact_tail",
    "run-embed": "bench_run_embed",
    "finetune-ablation": "finetune_ablation",
    "join-members": "join_members",
    "cohort-norm": "cohort_norm",
    "machine": "machine",
    "identify": "bench_identify",
    "scorefiles": "bench_scorefiles",
    "onnx-parity": "onnx_parity",
    "oracles": "bench_oracles",
    "paired-jackknife": "paired_jackknife",
    "memory": "bench_memory",
}
"""`cli.py bench NAME` -> the module `benchmarks.MODULE`, whose `command` it runs (as `python -m benchmarks.MODULE`)."""


class BenchmarkGroup(click.Group):
    """Each benchmark's options live in its own module, imported only when that benchmark runs."""

    def list_commands(self, ctx) -> list[str]:
        return list(BENCHMARKS)

    def get_command(self, ctx, name: str):
        if name not in BENCHMARKS:
            return None
        return importlib.import_module(f"benchmarks.{BENCHMARKS[name]}").command
