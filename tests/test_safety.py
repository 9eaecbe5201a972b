"""Safety (mirrors pipeline/outputs.py, results.py, untrusted.py): commands replace only what they wrote,
refuse dangerous --out locations before creating anything, take one lock per output, load untrusted files
without running code, and keep paths from protocol files inside the data root. Every case on throwaway
folders, through the CLI where a user would meet it."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.faces.untrusted import load_pickle
from pipeline.report.results import FIGURE_FILES
from tests.stores import random_store, write_store

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too) with its content hash: nothing may appear, vanish or change."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def store(tmp_path) -> Path:
    folder = tmp_path / "stores"
    folder.mkdir()
    path, _, _ = random_store(folder / "s.h5", 40, 8, seed=3)
    (folder / "other.h5").write_bytes(b"another store")
    return path


# ---------------------------------------------------------------------------------------------------- score/merge


def test_overwrite_refuses_a_folder_holding_a_users_file(store, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    for extra in ((), ("--rows", "0:4")):
        res = cli("score", store, "--all-pairs", "--out", victim, "--overwrite", *extra)
        assert res.exit_code == 2, res.output
        assert "notes.txt" in res.output and "not a results folder" in res.output
    res = cli("merge", tmp_path / "nothing", "--out", victim, "--overwrite")
    assert res.exit_code == 2 and "notes.txt" in res.output
    assert snapshot(tmp_path) == before


def test_out_holding_the_store_is_refused_before_anything_is_created(store, tmp_path):
    before = snapshot(tmp_path)
    for out in (store.parent, tmp_path):
        for extra in ((), ("--overwrite",), ("--rows", "0:4", "--overwrite")):
            res = cli("score", store, "--all-pairs", "--out", out, *extra)
            assert res.exit_code == 2, res.output
            assert "holds the input" in res.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_working_folder_parents_and_root_are_refused(store, tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    res = cli("score", store, "--all-pairs", "--rows", "0:4", "--out", out, "--overwrite")
    assert res.exit_code == 2, res.output
    assert "root folder" in res.output or "working folder" in res.output
    assert snapshot(tmp_path) == before


def test_data_root_is_refused(store, tmp_path):
    data_root = tmp_path / "data"
    (data_root / "lfw-py").mkdir(parents=True)
    import h5py

    with h5py.File(store, "a") as f:
        f.attrs["data_root"] = str(data_root)
    for out in (data_root, tmp_path):
        res = cli("score", store, "--all-pairs", "--out", out, "--overwrite")
        assert res.exit_code == 2 and ("data root" in res.output or "holds the input" in res.output), res.output


def test_overwrite_replaces_a_results_folder_of_score(store, tmp_path):
    out = tmp_path / "res"
    assert cli("score", store, "--all-pairs", "--out", out, "--no-progress").exit_code == 0
    first = (out / "metrics.json").read_text()
    res = cli("score", store, "--all-pairs", "--out", out, "--no-progress")
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = cli("score", store, "--all-pairs", "--out", out, "--no-progress", "--overwrite", "--metric", "cosine")
    assert res.exit_code == 0, res.output
    assert (out / "metrics.json").read_text() != first
    assert sorted(p.name for p in out.iterdir()) == sorted(["histogram.npz", "metrics.json", "roc.csv", *FIGURE_FILES])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res", "stores"]  # no lock, no old or temporary folder
    # a --rows part folder is ours too, and so is a merged one
    sorted_store = write_store(tmp_path / "sorted.h5", np.ones((6, 2), np.float32), np.array([0, 0, 1, 1, 2, 2]))
    part = tmp_path / "part"
    for extra in ((), ("--overwrite",)):
        res = cli("score", sorted_store, "--all-pairs", "--rows", "0:6", "--out", part, *extra)
        assert res.exit_code == 0, res.output
    assert cli("merge", part, "--out", out, "--overwrite").exit_code == 0


def test_a_failed_replace_puts_the_old_folder_back(store, tmp_path, monkeypatch):
    out = tmp_path / "res"
    assert cli("score", store, "--all-pairs", "--out", out, "--no-progress").exit_code == 0
    before = snapshot(out)
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == out and ".old" not in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing)
    res = cli("score", store, "--all-pairs", "--out", out, "--no-progress", "--overwrite", "--metric", "cosine")
    assert res.exit_code != 0
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res", "stores"]


def test_replace_folder_never_deletes_foreign_files(tmp_path):
    """Even when a file appears in the old folder after it was recognised, it survives the replace."""
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    new.mkdir()
    (out / "metrics.json").write_text('{"n_pairs": 1}')
    (new / "metrics.json").write_text('{"n_pairs": 2}')
    calls = []

    def recognise(path):
        calls.append(path)
        (path / "late.txt").write_text("arrived late")  # after the check, before the move
        return None

    outputs.replace_folder(new, out, recognise, ["metrics.json"])
    assert (out / "metrics.json").read_text() == '{"n_pairs": 2}'
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old")]
    assert len(kept) == 1 and (kept[0] / "late.txt").read_text() == "arrived late"


# ---------------------------------------------------------------------------------------------------- locks


def hold_lock(path: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pipeline.outputs import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_the_first_ones_partial_kept(tiny_lfw, tmp_path):
    out = tmp_path / "a.h5"
    partial = tmp_path / "a.h5.partial"
    partial.write_bytes(b"\x89HDF\r\n\x1a\n the first run's rows")
    holder = hold_lock(out)
    try:
        res = cli("embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", out)
        assert res.exit_code == 2, res.output
        assert f"pid {holder.pid}" in res.output and "another run" in res.output
        assert partial.read_bytes() == b"\x89HDF\r\n\x1a\n the first run's rows"
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is gone with it, whatever its lock file says
    with outputs.output_lock(out):
        pass
    assert not outputs.lock_path(out).exists()


def test_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "x"
    outputs.lock_path(out).write_text("pid 999999 on nowhere: a killed run\n")
    with outputs.output_lock(out):
        assert "pid" in outputs.lock_path(out).read_text()


# ---------------------------------------------------------------------------------------------------- embed/finetune/report


def test_embed_overwrite_refuses_a_file_it_did_not_write(tiny_lfw, tmp_path):
    out = tmp_path / "a.h5"
    out.write_text("a user's file named like a store")
    for extra in ((), ("--overwrite",)):
        res = cli("embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", out, *extra)
        assert res.exit_code == 2, res.output
    assert out.read_text() == "a user's file named like a store"
    (tmp_path / "b.h5.partial").write_text("not HDF5")
    res = cli("embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", tmp_path / "b.h5")
    assert res.exit_code == 2 and "b.h5.partial" in res.output
    assert (tmp_path / "b.h5.partial").read_text() == "not HDF5"
    res = cli("embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", tmp_path)
    assert res.exit_code == 2 and "is a folder" in res.output


def test_embed_overwrite_replaces_its_own_store(tiny_lfw, tmp_path):
    out = tmp_path / "a.h5"
    args = ("embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--limit", "3", "--out", out)
    assert cli(*args).exit_code == 0
    assert cli(*args, "--overwrite", "--seed", "1").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "data"]


def test_finetune_keeps_files_it_did_not_write(tiny_lfw, tmp_path):
    log, best = tmp_path / "x.log", tmp_path / "x.best.pt"
    log.write_text("my own log\n")
    args = ("finetune", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", tmp_path / "x.pt")
    for extra in ((), ("--overwrite",), ("--resume",)):
        res = cli(*args, *extra)
        assert res.exit_code == 2, res.output
        assert "x.log" in res.output
    assert log.read_text() == "my own log\n"
    log.unlink()
    best.write_text("not a checkpoint")
    assert cli(*args).exit_code == 2 and best.read_text() == "not a checkpoint"
    best.unlink()
    (tmp_path / "x.pt").write_text("not a checkpoint either")
    res = cli(*args, "--overwrite")
    assert res.exit_code == 2 and "not a finetune checkpoint" in res.output
    weights = tmp_path / "w.pt"
    torch.save({"model": {}, "config": {}}, weights)
    res = cli("finetune", "--data-root", tiny_lfw, "--weights", weights, "--out", weights, "--overwrite")
    assert res.exit_code == 2 and "also an input" in res.output


def test_report_refuses_to_replace_a_users_table(store, tmp_path):
    result = tmp_path / "res"
    assert cli("score", store, "--all-pairs", "--out", result, "--no-progress").exit_code == 0
    out = tmp_path / "rep"
    out.mkdir()
    (out / "table.md").write_text("# my table\n")
    for extra in ((), ("--overwrite",)):
        res = cli("report", result, "--out", out, *extra)
        assert res.exit_code == 2, res.output
    assert (out / "table.md").read_text() == "# my table\n" and not (out / "roc.png").exists()
    (out / "table.md").unlink()
    assert cli("report", result, "--out", out).exit_code == 0
    res = cli("report", result, "--out", out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert cli("report", result, "--out", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["roc.png", "table.md"]
    res = cli("report", result, "--out", result, "--overwrite")  # would replace the result's own roc.png
    assert res.exit_code == 2


def test_run_refuses_the_working_folder(tiny_lfw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    res = cli("run", "--data-root", tiny_lfw, "--weights", "none", "--out", ".", "--limit", "4")
    assert res.exit_code == 2 and "working folder" in res.output
    res = cli("run", "--data-root", tiny_lfw, "--weights", "none", "--out", tiny_lfw, "--limit", "4")
    assert res.exit_code == 2 and "data root" in res.output
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- loading


def test_planted_imagenet_weights_run_no_code(tiny_lfw, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with open(cache / "squeezenet1_0-b66bff10.pth", "wb") as f:
        pickle.dump(Payload(marker), f)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    res = cli("embed", "--data-root", tiny_lfw, "--weights", "imagenet", "--workers", "0", "--out", tmp_path / "a.h5")
    assert res.exit_code == 2, res.output
    assert "sha256" in res.output
    assert not marker.exists()
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "a.h5.partial").exists()


def test_weights_files_run_no_code(tmp_path):
    from pipeline.nets.models import read_weights_file

    marker, path = tmp_path / "pwned", tmp_path / "w.pth"
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(PipelineError):
        read_weights_file(path)
    assert not marker.exists()


def test_restricted_unpickler(tmp_path):
    marker, bad, good = tmp_path / "pwned", tmp_path / "bad.bin", tmp_path / "good.bin"
    bad.write_bytes(pickle.dumps(([b"\xff\xd8jpeg"], Payload(marker))))
    with pytest.raises(PipelineError, match="refusing"):
        load_pickle(bad)
    assert not marker.exists()
    flags = np.array([True, False, True])
    good.write_bytes(pickle.dumps(([b"\xff\xd8a", b"\xff\xd8b"], flags, [True, np.bool_(False)]), protocol=2))
    bins, issame, plain = load_pickle(good)
    assert bins == [b"\xff\xd8a", b"\xff\xd8b"] and issame.tolist() == [True, False, True] and plain == [True, False]
    good.write_bytes(good.read_bytes()[:20])
    with pytest.raises(PipelineError, match="truncated"):
        load_pickle(good)


# ---------------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["../../x", "..", "/etc", "a\\..\\b"])
def test_protocol_names_outside_the_data_root_are_refused(tiny_lfw, tmp_path, name):
    people = tiny_lfw / "lfw-py" / "peopleDevTest.txt"
    lines = people.read_text().splitlines()
    lines[2] = f"{name}\t1"
    people.write_text("\n".join(lines) + "\n")
    res = cli("embed", "--data-root", tiny_lfw, "--weights", "none", "--workers", "0", "--out", tmp_path / "a.h5")
    assert res.exit_code == 2, res.output
    assert "line 3" in res.output and "outside the data root" in res.output
    pairs = tiny_lfw / "lfw-py" / "pairsDevTest.txt"
    lines = pairs.read_text().splitlines()
    lines[-1] = f"Alice_Able\t1\t{name}\t1"
    pairs.write_text("\n".join(lines) + "\n")
    res = cli("embed", "--data-root", tiny_lfw, "--protocol", "pairs", "--weights", "none", "--out", tmp_path / "b.h5")
    assert res.exit_code == 2 and f"line {len(lines)}" in res.output, res.output


def test_lfw_slice_writes_only_inside_its_out(tiny_lfw, tmp_path):
    from benchmarks.lfw_slice import make_slice

    people = tiny_lfw / "lfw-py" / "peopleDevTest.txt"
    people.write_text(people.read_text().replace("Alice_Able", ".."))
    before = snapshot(tmp_path)
    with pytest.raises(PipelineError):
        make_slice(tiny_lfw, tmp_path / "slice")
    assert snapshot(tmp_path) == before


def test_lock_is_not_inherited_by_forked_workers(tmp_path):
    """DataLoader workers are forked while the lock is held: after the main process has gone, a new run
    gets the lock at once although a forked child still lives."""
    out = tmp_path / "a.h5"
    code = (
        "import os, sys, time; from pipeline.outputs import output_lock\n"
        "with output_lock(sys.argv[1]):\n"
        "    if os.fork() == 0:\n        time.sleep(10); os._exit(0)\n"
        "    print('forked', flush=True); os._exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "forked", proc.stderr
    t0 = time.perf_counter()
    with outputs.output_lock(out):
        pass
    assert time.perf_counter() - t0 < 5
