"""Fault suite: inject faults into real command runs and count what survives.

    python -m benchmarks.faults [--trials N] [--workdir DIR] [--seed S]

Every command runs as a user runs it (`python cli.py ...` in its own process) on a tiny generated LFW and
small random stores. Faults: SIGKILL of the main process at a random moment of `embed` (DataLoader workers
left running), `finetune`, `score`, `merge` and `run`, each followed at once by the restart a scheduler or a
user would issue (`--resume` for embed and finetune, the same command otherwise); two runs started together
on one output; writes failing at a random size (`RLIMIT_FSIZE`, as a full disk), then a restart without the
limit; corrupt and truncated inputs. For each fault the outcome is one of:

- recovered: the output ends equal to an uninterrupted run's, bit for bit (arrays, checkpoint tensors; for
  results folders the histograms and every non-timing metric);
- refused: exit code 2 with one `error:` line, no traceback, nothing at the output path (the expected
  outcome for corrupt inputs; a write failure is followed by a restart, so it ends recovered or lost; finetune
  may keep its last checkpoint, not marked complete, for that restart);
- lost: anything else (a different or unreadable output, a traceback, a hang). This must be zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from benchmarks import argparse_command
from benchmarks.synthetic import make_tiny_lfw, random_store, write_store

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600


@dataclass
class Tally:
    """Outcomes of one kind of fault."""

    fault: str
    trials: int = 0
    recovered: int = 0
    refused: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, outcome: str, note: str = "") -> None:
        self.trials += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        if outcome == "lost" and note and len(self.notes) < 3:
            self.notes.append(note)


def cli(*args, cwd: Path, fsize: int | None = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def start(*args, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def clean_refusal(res) -> bool:
    err = res.stderr
    return (
        res.returncode == 2
        and "Traceback" not in err
        and sum(line.startswith("error:") for line in err.splitlines()) == 1
    )


# ---------------------------------------------------------------------------------------------------- comparisons


def same_store(a: Path, b: Path) -> bool:
    try:
        with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
            return bool(fa.attrs.get("complete")) and all(
                np.array_equal(fa[k][...], fb[k][...]) for k in ("embeddings", "labels", "paths")
            )
    except (OSError, KeyError):
        return False


def same_checkpoint(a: Path, b: Path) -> bool:
    import torch

    try:
        ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    except Exception:
        return False
    return bool(ca.get("complete")) and all(torch.equal(ca["model"][k], cb["model"][k]) for k in cb["model"])


def resumable(path: Path) -> bool:
    """A readable checkpoint not marked complete: what `finetune --resume` continues."""
    import torch

    try:
        return not torch.load(path, map_location="cpu", weights_only=True).get("complete")
    except Exception:
        return False


METRIC_KEYS = ("auc", "n_pairs", "n_positive", "eer", "tar_at_far", "best_balanced_threshold", "max_distance", "bin_lo")


def same_results(a: Path, b: Path) -> bool:
    try:
        ha, hb = np.load(a / "histogram.npz"), np.load(b / "histogram.npz")
        ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    except (OSError, ValueError, KeyError):
        return False
    return all(np.array_equal(ha[k], hb[k]) for k in ("pos", "neg")) and all(ma[k] == mb[k] for k in METRIC_KEYS)


def same_summary(a: Path, b: Path) -> bool:
    try:
        sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    except (OSError, ValueError):
        return False
    return all(sa[p] == sb[p] for p in ("pairs", "people"))


# ---------------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One command of the suite: how to run it into `out`, how to restart it, how to compare its output."""

    name: str
    args: Callable[[Path], list]
    """Arguments of the command writing `out`."""
    resume: list
    """Extra arguments of the restart."""
    same: Callable[[Path, Path], bool]
    out_name: str
    reference: Path | None = None
    seconds: float = 0.0

    def make_reference(self, work: Path) -> None:
        ref = work / f"ref-{self.name}"
        ref.mkdir()
        t0 = time.perf_counter()
        res = cli(*self.args(ref / self.out_name), cwd=work)
        self.seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"reference {self.name} failed:\n{res.stderr[-3000:]}")
        self.reference = ref / self.out_name


def make_jobs(work: Path) -> dict[str, Job]:
    lfw = make_tiny_lfw(work / "lfw")
    store, _, _ = random_store(work / "store.h5", 1500, 48, seed=1)
    sorted_store = write_store(work / "sorted.h5", np.random.default_rng(2).standard_normal((900, 40)).astype(np.float32),
                               np.sort(np.random.default_rng(3).integers(0, 300, 900)))  # fmt: skip
    parts = work / "parts"
    for a, b in ((0, 300), (300, 900)):
        res = cli("score", sorted_store, "--all-pairs", "--rows", f"{a}:{b}", "--out", parts / f"{a}", cwd=work)
        assert res.returncode == 0, res.stderr
    common = ["--data-root", lfw, "--weights", "none"]
    ft = ["--max-pairs", "8", "--phase1-epochs", "1", "--phase2-epochs", "1", "--batch-size", "4", "--workers", "0"]
    return {
        "embed": Job("embed", lambda out: ["embed", *common, "--batch-size", "2", "--workers", "2", "--out", out],
                     ["--resume"], same_store, "a.h5"),
        "finetune": Job("finetune", lambda out: ["finetune", *common, *ft, "--out", out], ["--resume"],
                        same_checkpoint, "m.pt"),
        "score": Job("score", lambda out: ["score", store, "--all-pairs", "--no-progress", "--out", out], [],
                     same_results, "res"),
        "merge": Job("merge", lambda out: ["merge", parts / "0", parts / "300", "--out", out], [], same_results, "res"),
        "run": Job("run", lambda out: ["run", *common, *ft, "--out", out], [], same_summary, "run"),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- faults


def judge(job: Job, out: Path, res, tally: Tally, allow_refusal: bool = False) -> None:
    """Recovered when the output equals the reference; refused when that is allowed and clean; lost otherwise."""
    if "Traceback" in res.stderr:
        tally.add("lost", f"traceback: {res.stderr.strip().splitlines()[-1][:150]}")
    elif res.returncode in (0, 2) and os.path.lexists(out) and job.same(out, job.reference):
        tally.add("recovered")
    elif allow_refusal and clean_refusal(res) and not os.path.lexists(out):
        tally.add("refused")
    else:
        tally.add("lost", f"exit {res.returncode}: {res.stderr.strip()[-200:]}")


def kill_and_restart(job: Job, trial: Path, rng: random.Random, tally: Tally) -> None:
    out = trial / job.out_name
    proc = start(*job.args(out), cwd=trial)
    time.sleep(rng.uniform(0.1, 1.05) * job.seconds)
    proc.send_signal(signal.SIGKILL)  # the main process only: its DataLoader workers go on for a while
    proc.communicate()
    judge(job, out, cli(*job.args(out), *job.resume, cwd=trial), tally)


def concurrent(job: Job, trial: Path, rng: random.Random, tally: Tally) -> None:
    out = trial / job.out_name
    first = start(*job.args(out), cwd=trial)
    time.sleep(rng.uniform(0.0, 0.5))
    second = cli(*job.args(out), cwd=trial)
    first_out, first_err = first.communicate(timeout=TIMEOUT)
    codes = sorted([first.returncode, second.returncode])
    both = first_err + second.stderr
    if codes == [0, 2] and ("another run" in both or "exists" in both) and job.same(out, job.reference):
        tally.add("recovered")
    else:
        tally.add("lost", f"exits {first.returncode}/{second.returncode}: {both.strip()[-200:]}")


def write_failure(job: Job, trial: Path, rng: random.Random, tally: Tally, size: int) -> None:
    out = trial / job.out_name
    res = cli(*job.args(out), cwd=trial, fsize=rng.randint(1024, max(2048, int(size * 1.1))))
    if res.returncode == 0:
        first_ok = job.same(out, job.reference)
    else:  # finetune keeps its last good checkpoint (not marked complete) for --resume; others leave nothing
        first_ok = clean_refusal(res) and (not os.path.lexists(out) or (job.name == "finetune" and resumable(out)))
    if not first_ok:
        tally.add("lost", f"under the limit: exit {res.returncode}: {res.stderr.strip()[-200:]}")
        return
    judge(job, out, cli(*job.args(out), *job.resume, cwd=trial), tally)


def corrupt_inputs(work: Path, jobs: dict[str, Job], tally: Tally) -> None:
    """Each damaged input must be refused cleanly, with nothing written."""
    d = work / "corrupt"
    d.mkdir()
    good, _, _ = random_store(d / "good.h5", 50, 8)
    cases: list[tuple[str, list]] = []
    (d / "truncated.h5").write_bytes(good.read_bytes()[:3000])
    (d / "garbage.h5").write_bytes(os.urandom(5000))
    write_store(d / "float_labels.h5", np.ones((5, 3), np.float32), None)
    with h5py.File(d / "float_labels.h5", "a") as f:
        f["labels"] = np.arange(5) / 10
    write_store(d / "nan.h5", np.full((5, 3), np.nan, np.float32), np.arange(5) % 2)
    write_store(d / "short_paths.h5", np.ones((5, 3), np.float32), np.arange(5) % 2)
    with h5py.File(d / "short_paths.h5", "a") as f:
        f["paths"] = np.array([b"a", b"b"])
    for name in ("truncated", "garbage", "float_labels", "nan", "short_paths"):
        cases.append((name, ["score", d / f"{name}.h5", "--all-pairs", "--out", d / f"out-{name}"]))
    ckpt = jobs["finetune"].reference
    (d / "truncated.pt").write_bytes(ckpt.read_bytes()[:5000])
    lfw = make_tiny_lfw(d / "lfw")
    cases.append(
        ("truncated checkpoint", ["embed", "--data-root", lfw, "--weights", d / "truncated.pt", "--out", d / "o1.h5"])
    )
    bad_lfw = make_tiny_lfw(d / "lfw-badjpeg")
    (bad_lfw / "lfw-py" / "lfw-deepfunneled" / "Alice_Able" / "Alice_Able_0002.jpg").write_bytes(
        b"\xff\xd8\xff no jpeg"
    )
    cases.append(("corrupt JPEG", ["embed", "--data-root", bad_lfw, "--weights", "none", "--out", d / "o2.h5"]))
    bad_proto = make_tiny_lfw(d / "lfw-badproto")
    people = bad_proto / "lfw-py" / "peopleDevTest.txt"
    people.write_text(people.read_text().replace("Bob_Baker\t2", "Bob_Baker\ttwo"))
    cases.append(
        ("malformed protocol line", ["embed", "--data-root", bad_proto, "--weights", "none", "--out", d / "o3.h5"])
    )
    part = d / "part"
    shutil.copytree(work / "parts" / "0", part)
    (part / "histogram.npz").write_bytes((part / "histogram.npz").read_bytes()[:200])
    cases.append(("truncated histogram", ["merge", part, work / "parts" / "300", "--out", d / "o4"]))
    part2 = d / "part2"
    shutil.copytree(work / "parts" / "0", part2)
    (part2 / "part.json").write_text("{not json")
    cases.append(("garbage part.json", ["merge", part2, work / "parts" / "300", "--out", d / "o5"]))
    for name, args in cases:
        out = Path(args[args.index("--out") + 1])
        res = cli(*args, cwd=d)
        if clean_refusal(res) and not os.path.lexists(out):
            tally.add("refused")
        else:
            tally.add("lost", f"{name}: exit {res.returncode}: {res.stderr.strip()[-200:]}")


# ---------------------------------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class FaultsConfig:
    trials: int = 15
    """SIGKILL trials per command (run gets a third of them); concurrency and write-failure trials: half."""
    seed: int = 0
    """Seed of the kill moments and size limits."""
    workdir: Path | None = None
    """Where the inputs and outputs go (default: a temporary folder, removed afterwards)."""
    commands: tuple[str, ...] = ("embed", "finetune", "score", "merge", "run")
    """Which commands to kill."""

    def __post_init__(self):
        if self.trials < 1:
            raise ValueError("trials must be >= 1")


def run_suite(cfg: FaultsConfig) -> list[Tally]:
    rng = random.Random(cfg.seed)
    tmp = Path(tempfile.mkdtemp(prefix="faults-", dir=cfg.workdir))
    try:
        jobs = make_jobs(tmp)
        for job in jobs.values():
            if job.name in cfg.commands or job.name == "finetune":
                job.make_reference(tmp)
        tallies = []
        counter = iter(range(1 << 30))

        def trial_dir() -> Path:
            p = tmp / f"trial-{next(counter)}"
            p.mkdir()
            return p

        for name in cfg.commands:
            tally = Tally(f"SIGKILL {name}, restart at once")
            for _ in range(max(1, cfg.trials // 3) if name == "run" else cfg.trials):
                kill_and_restart(jobs[name], trial_dir(), rng, tally)
            tallies.append(tally)
        for name in ("embed", "score"):
            tally = Tally(f"two {name} runs on one output")
            for _ in range(max(1, cfg.trials // 2)):
                concurrent(jobs[name], trial_dir(), rng, tally)
            tallies.append(tally)
        sizes = {"embed": 40_000, "score": 200_000, "finetune": 6_000_000}
        for name, size in sizes.items():
            tally = Tally(f"{name}: writes fail (file size limit), then restart")
            for _ in range(max(1, cfg.trials // 2)):
                write_failure(jobs[name], trial_dir(), rng, tally, size)
            tallies.append(tally)
        tally = Tally("corrupt or truncated input")
        corrupt_inputs(tmp, jobs, tally)
        tallies.append(tally)
        return tallies
    finally:
        if cfg.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder


def format_table(tallies: list[Tally]) -> str:
    lines = [
        "| fault | trials | recovered (= uninterrupted result) | refused cleanly | lost or corrupted |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in tallies:
        lines.append(f"| {t.fault} | {t.trials} | {t.recovered} | {t.refused} | {t.lost} |")
    total = Tally("all")
    for t in tallies:
        total.trials, total.recovered = total.trials + t.trials, total.recovered + t.recovered
        total.refused, total.lost = total.refused + t.refused, total.lost + t.lost
    lines.append(f"| **all** | {total.trials} | {total.recovered} | {total.refused} | {total.lost} |")
    notes = [f"- {t.fault}: {n}" for t in tallies for n in t.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=15, help="SIGKILL trials per command (default 15).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep inputs and outputs under this folder.")
    parser.add_argument("--commands", default="embed,finetune,score,merge,run", help="Commands to kill.")
    args = parser.parse_args(argv)
    cfg = FaultsConfig(args.trials, args.seed, args.workdir, tuple(args.commands.split(",")))
    t0 = time.perf_counter()
    tallies = run_suite(cfg)
    print(format_table(tallies))
    print(f"{sum(t.trials for t in tallies)} faults in {time.perf_counter() - t0:.0f} s")
    if any(t.lost for t in tallies):
        sys.exit(1)


command = argparse_command("faults", main, __doc__)

if __name__ == "__main__":
    main()
