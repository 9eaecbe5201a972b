"""FAISS's OpenBLAS: which kernel family it runs, and the import that sets it (`pipeline.scoring.faiss_blas`).
A process loads that library once, so each check runs in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.scoring import faiss_blas
from pipeline.scoring.faiss_blas import LEVELS, cpu_family, cpu_level

# found, not imported: a plain `import faiss` at collection would load FAISS's OpenBLAS on the kernels its own
# detection picks for the whole session, and the in-process scoring would then differ from a fresh process's
pytestmark = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed")

ROOT = Path(__file__).parents[1]

# argv[1]: the family `cpu_family` names in the probe (empty: this CPU's)
PROBE = """
import json, os, sys
import numpy
from threadpoolctl import threadpool_info
from pipeline.scoring import faiss_blas
if sys.argv[1]:
    faiss_blas.cpu_family = lambda: sys.argv[1]
def numpy_kernels():
    return {i["filepath"]: i.get("architecture") for i in threadpool_info() if i["user_api"] == "blas"}
env, before = dict(os.environ), numpy_kernels()
k = faiss_blas.faiss_blas()
after = numpy_kernels()
print(json.dumps({"env_same": dict(os.environ) == env, "family": k and k.family, "current": k and k.current,
                  "numpy_same": all(after[p] == a for p, a in before.items()), "faiss_loaded": "faiss" in sys.modules}))
"""


def probe(family: str = "", **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"} | env
    r = subprocess.run([sys.executable, "-c", PROBE, family], capture_output=True, text=True, cwd=ROOT, env=environ,
                       check=True)  # fmt: skip
    return json.loads(r.stdout)


def test_cpu_family_matches_the_instruction_set():
    family, level = cpu_family(), cpu_level()
    if level is None or level == 0:
        assert family is None
    else:
        assert LEVELS[family.lower()] == level


def test_detection_names_a_family_and_the_import_leaves_the_environment():
    r = probe()
    if r["family"] is None:
        pytest.skip("faiss brings no OpenBLAS of its own here")
    assert r["faiss_loaded"] and r["env_same"] and r["numpy_same"]
    assert isinstance(r["family"], str) and r["family"]  # e.g. Haswell, Zen, SkylakeX, Prescott
    if cpu_family() is not None:
        assert r["family"] == cpu_family() and r["current"]


@pytest.mark.skipif(cpu_level() is None, reason="not an x86 CPU with /proc/cpuinfo")
def test_the_family_reaches_faiss_only():
    """The variable, set for the import only, picks FAISS's kernels (Prescott, which every x86-64 CPU runs)
    and neither NumPy's nor the environment after; a variable the user set is left to act alone."""
    r = probe("Prescott")
    assert r == {**r, "family": "Prescott", "env_same": True, "numpy_same": True}
    assert r["current"] == (cpu_level() == 0)
    r = probe("Prescott", OPENBLAS_CORETYPE="Sandybridge" if cpu_level() >= 1 else "Prescott")
    assert r["env_same"] and r["family"] == ("Sandybridge" if cpu_level() >= 1 else "Prescott")


def test_bench_machine_says_which_kernels_faiss_runs():
    from benchmarks.machine import faiss_rows

    rows = dict(faiss_rows())
    assert list(rows) == ["FAISS's OpenBLAS, plain `import faiss`", "FAISS's OpenBLAS, the scoring's import"]
    family = probe()["family"]
    for value in rows.values():
        assert value == "no OpenBLAS of its own" if family is None else "GFLOP/s" in value
    if cpu_family() is not None and not os.environ.get("OPENBLAS_CORETYPE"):  # the probes run in this environment
        assert rows["FAISS's OpenBLAS, the scoring's import"].startswith(f"{cpu_family()} (OpenBLAS ")


def test_this_session_loads_faiss_as_a_fresh_process():
    """Nothing in the test session imported faiss plainly before the scoring did: in-process FAISS runs the
    kernels a fresh `cli.py score` runs (otherwise in-process and torchrun results differ in the last bits)."""
    k = faiss_blas.faiss_blas()
    fresh = probe()["family"]
    if k is None or fresh is None:
        pytest.skip("faiss brings no OpenBLAS of its own here")
    assert k.family == fresh


PLAIN_FIRST = """
import logging, faiss
logging.basicConfig(level=logging.WARNING)
from pipeline.scoring import faiss_blas
k = faiss_blas.loaded_kernels(faiss)
other = "Sandybridge" if k and k.family == "Prescott" else "Prescott"
faiss_blas.cpu_family = lambda: other  # a family the plain import did not choose
faiss_blas.import_faiss(); faiss_blas.import_faiss()
print(other if k else "")
"""


def test_faiss_imported_plainly_before_gets_one_warning():
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    r = subprocess.run([sys.executable, "-c", PLAIN_FIRST], capture_output=True, text=True, cwd=ROOT, env=environ,
                       check=True)  # fmt: skip
    other = r.stdout.strip()
    if not other:
        pytest.skip("faiss brings no OpenBLAS of its own here")
    assert r.stderr.count("faiss was imported before the scoring") == 1
    assert f"not {other} as a fresh" in r.stderr
