"""Where the memory of `finetune` and `run` goes: the command runs in a subprocess while the resident memory of
it and its children (the decoding workers) is sampled; each `memory after STAGE` line the command logs
(`pipeline.runtime.log_memory`: its own peak so far and the bytes of what the stage holds) becomes a row.

    python cli.py bench memory finetune --data-root ../shared/data --image-set deepfunneled --model squeezenet1_0 \\
        --weights ../shared/weights/squeezenet1_0-imagenet-dc.pth --recipe best --members 1 --phase1-epochs 1 \\
        --cohort-top 0 --seed 0 --out /tmp/mem/model.pt
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"memory after (.+?): peak RSS (\d+) MiB(.*)")
HELD = re.compile(r", (\w+) (\d+) MiB")


class TreeSampler(threading.Thread):
    """The largest memory of a process and its children together, sampled every `every` seconds: their proportional
    set sizes (PSS: a page shared by k processes counts 1/k in each) where the system gives them (Linux), else
    their resident sizes. Forked decoding workers map their parent's pages too; their resident sizes added to the
    parent's would count those pages twice."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.every, self.peak, self.done = psutil.Process(pid), every, 0, False

    def run(self) -> None:
        import psutil

        while not self.done:
            try:
                procs = (self.proc, *self.proc.children(recursive=True))
                self.peak = max(self.peak, sum(_proportional(p) for p in procs))
            except psutil.Error:  # a child that ended meanwhile, or the command itself
                pass
            time.sleep(self.every)


def _proportional(p) -> int:
    try:
        return p.memory_full_info().pss
    except AttributeError:  # no PSS (macOS, Windows)
        return p.memory_info().rss


def measure(argv: list[str]) -> tuple[list[dict], float, float, int]:
    """(rows, tree peak MiB, seconds, exit code) of `cli.py -v ARGV`: one row per `memory after` line."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "cli.py", *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True, bufsize=1)
    sampler = TreeSampler(p.pid)
    sampler.start()
    rows = []
    for line in p.stderr:
        m = LINE.search(line)
        if m:
            held = {k: int(v) for k, v in HELD.findall(m.group(3))}
            rows.append(dict(stage=m.group(1), peak=int(m.group(2)), tree=sampler.peak / 2**20, held=held,
                             seconds=time.perf_counter() - t0))  # fmt: skip
    code = p.wait()
    sampler.done = True
    return rows, sampler.peak / 2**20, time.perf_counter() - t0, code


@click.command("memory", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
def command(argv: tuple[str, ...]) -> None:
    """Run `cli.py ARGV` (finetune or run) and print, per stage, what it holds and its peak memory so far."""
    rows, tree, seconds, code = measure(list(argv))
    click.echo(f"cli.py {' '.join(argv)}\n")
    click.echo("| after | seconds | held | peak RSS so far (process) | peak so far (with its workers, PSS sampled) |")
    click.echo("| --- | ---: | --- | ---: | ---: |")
    for r in rows:
        held = ", ".join(f"{k} {v:,} MiB" for k, v in r["held"].items()) or "-"
        click.echo(f"| {r['stage']} | {r['seconds']:.0f} | {held} | {r['peak']:,} MiB | {r['tree']:,.0f} MiB |")
    click.echo(f"\nexit {code}, {seconds:.0f} s; peak of the process and its workers together (PSS): {tree:,.0f} MiB")
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    command()
