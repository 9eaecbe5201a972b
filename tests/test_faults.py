"""Faults (mirrors benchmarks/faults.py and the fault handling in pipeline/): killed runs restart at once to the
uninterrupted result, two runs on one output leave it intact, failed writes are one error line, damaged inputs
are refused. The full suite with 100+ faults is `python -m benchmarks.faults`; here one trial of each kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import faults
from cli import main
from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.metrics.roc import HistogramROC
from pipeline.report.results import RESULT_FILES
from tests.stores import random_store, write_store

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_fault_suite_one_trial_each(tmp_path):
    tallies = faults.run_suite(faults.FaultsConfig(trials=1, workdir=tmp_path, commands=("embed", "score")))
    table = faults.format_table(tallies)
    assert sum(t.trials for t in tallies) >= 15, table
    assert all(t.lost == 0 for t in tallies), table
    assert all(t.recovered == t.trials for t in tallies if not t.fault.startswith("corrupt")), table


def run_killing_itself(patch: str, args: list) -> subprocess.CompletedProcess:
    """`cli.py ARGS` in a fresh process after `patch` (Python code) has made it SIGKILL itself somewhere."""
    code = f"import os, sys, runpy\n{patch}sys.argv = ['cli.py', *sys.argv[1:]]\nrunpy.run_path('cli.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_sigkill_of_embed_with_workers_resumes_at_once(tiny_lfw, tmp_path):
    """The killed run's DataLoader workers still live when the restart begins: they hold neither our lock nor
    HDF5's."""
    out = tmp_path / "a.h5"
    args = ["embed", "--data-root", tiny_lfw, "--weights", "none", "--batch-size", "2", "--workers", "2"]
    ref = faults.cli(*args, "--out", tmp_path / "ref.h5", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    patch = (
        "from pipeline.store.writer import StoreWriter\n"
        "write = StoreWriter.write\n"
        "def die(self, start, rows):\n"
        "    write(self, start, rows)\n"
        "    if self.rows_done >= 4: os.kill(os.getpid(), 9)\n"
        "StoreWriter.write = die\n"
    )
    killed = run_killing_itself(patch, [*args, "--out", out])
    assert killed.returncode == -9, killed.stderr
    with h5py.File(out.with_name("a.h5.partial"), "r") as f:
        assert 4 <= int(f.attrs["rows_done"]) < 10
    res = faults.cli(*args, "--out", out, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert faults.same_store(out, tmp_path / "ref.h5")
    res = faults.cli(*args, "--out", out, "--resume", cwd=tmp_path)  # requeued again: finished, nothing to do
    assert res.returncode == 0 and "already complete" in res.stderr


def test_write_failures_are_one_error_line(tiny_lfw, tmp_path):
    store, _, _ = random_store(tmp_path / "s.h5", 300, 16)
    res = faults.cli("score", store, "--all-pairs", "--out", tmp_path / "r", cwd=tmp_path, fsize=20_000)
    assert faults.clean_refusal(res) and "cannot write the results folder" in res.stderr, res.stderr
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r*"))
    args = ["embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", tmp_path / "a.h5"]
    res = faults.cli(*args, cwd=tmp_path, fsize=12_000)
    assert faults.clean_refusal(res) and "a.h5.partial" in res.stderr, res.stderr
    assert not (tmp_path / "a.h5").exists()
    res = faults.cli(*args, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.arange(6) / 10, "floats with fractions"),
        (np.array([b"a", b"b", b"a", b"c", b"b", b"a"]), "integer identities"),
        (np.array([0, 1, -1, 0, 1, 2]), "negative"),
    ],
)
def test_store_labels_must_be_integers(tmp_path, labels, message):
    path = write_store(tmp_path / "s.h5", np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32), None)
    with h5py.File(path, "a") as f:
        f["labels"] = labels
    res = cli("score", path, "--all-pairs", "--out", tmp_path / "r")
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_float_labels_without_fractions_are_identities(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    a = write_store(tmp_path / "a.h5", x, np.array([0, 0, 1, 1, 2, 2]))
    b = write_store(tmp_path / "b.h5", x, None)
    with h5py.File(b, "a") as f:
        f["labels"] = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    for path, out in ((a, "ra"), (b, "rb")):
        assert cli("score", path, "--all-pairs", "--out", tmp_path / out, "--no-progress").exit_code == 0
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("ra", "rb"))
    assert ma["auc"] == mb["auc"] and ma["n_positive"] == mb["n_positive"] == 3


def test_lengths_of_paths_and_labels_must_match(tmp_path):
    path = write_store(tmp_path / "s.h5", np.ones((4, 2), np.float32), np.array([0, 0, 1, 1]))
    with h5py.File(path, "a") as f:
        f["paths"] = np.array([b"x"])
    res = cli("score", path, "--all-pairs", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "/paths has 1 rows" in res.output


def test_damaged_histogram_is_refused(tmp_path):
    bad = tmp_path / "histogram.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PipelineError, match="cannot read histograms"):
        HistogramROC.load(bad)


def test_leftovers_of_killed_replaces_are_recovered(tmp_path):
    out = tmp_path / "res"
    old = tmp_path / ".res.old"
    old.mkdir()
    (old / "metrics.json").write_text('{"n_pairs": 3}')
    stale_file = tmp_path / ".res.1234.tmp"
    stale_file.write_text("half a file")
    stale_dir = tmp_path / ".res.abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "roc.csv").write_text("fpr")
    unrelated = tmp_path / ".res.notes.tmp"
    unrelated.write_text("not ours: no pid in the name")
    outputs.recover_leftovers(out, RESULT_FILES)
    assert (out / "metrics.json").read_text() == '{"n_pairs": 3}' and not old.exists()  # put back
    assert not stale_file.exists() and not stale_dir.exists() and unrelated.exists()
    old.mkdir()
    (old / "roc.png").write_text("png")
    outputs.recover_leftovers(out, RESULT_FILES)
    assert not old.exists() and (out / "metrics.json").exists()  # out present: the moved-aside copy goes


def test_sigkill_during_a_checkpoint_write_resumes_to_the_uninterrupted_result(tiny_lfw, tmp_path):
    args = ["finetune", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--max-pairs", "8",
            "--phase1-epochs", "1", "--phase2-epochs", "1", "--batch-size", "4"]  # fmt: skip
    ref = faults.cli(*args, "--out", tmp_path / "ref.pt", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    patch = (
        "from pipeline import outputs\n"
        "replace = outputs.replace_file\n"
        "calls = []\n"
        "def dying(write, path):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 3:\n"  # a checkpoint during training: temporary written, not yet renamed
        "        write(path.with_name(f'.{path.name}.{os.getpid()}.tmp')); os.kill(os.getpid(), 9)\n"
        "    replace(write, path)\n"
        "outputs.replace_file = dying\n"
    )
    out = tmp_path / "m.pt"
    killed = run_killing_itself(patch, [*args, "--out", out])
    assert killed.returncode == -9, killed.stderr
    assert list(tmp_path.glob(".m.pt.*.tmp"))  # the killed write's temporary
    res = faults.cli(*args, "--out", out, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert faults.same_checkpoint(out, tmp_path / "ref.pt")
    assert not list(tmp_path.glob(".m.pt.*.tmp"))  # removed under the lock by the restart


def test_nan_rows_are_named_in_memory_and_out_of_core(tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    x[5, 1] = np.nan
    path = write_store(tmp_path / "s.h5", x, np.arange(8) % 3)
    with h5py.File(path, "a") as f:
        f["paths"] = np.array([f"img{k}.jpg".encode() for k in range(8)])
    for extra in ((), ("--rows", "0:8")):
        res = cli("score", path, "--all-pairs", "--out", tmp_path / "r", *extra)
        assert res.exit_code == 2 and "rows 5 (img5.jpg)" in res.output, res.output
