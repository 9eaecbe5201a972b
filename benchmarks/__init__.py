"""Benchmarks: each prints a table of ratios measured in one run (logs and commands: docs/scoring.md, docs/embedding.md, docs/scaling.md, docs/faults.md)."""

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
