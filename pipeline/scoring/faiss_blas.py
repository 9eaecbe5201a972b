"""FAISS imported on current BLAS kernels, and which kernels its OpenBLAS runs.

The `faiss-cpu` wheel carries its own OpenBLAS (0.3.15 in faiss-cpu 1.15), which picks its kernels from the CPU
when it loads. On a CPU newer than that library it falls back to an old family (Prescott, SSE3, on Intel
Sapphire Rapids; Barcelona on AMD Zen 5). `import_faiss` sets OPENBLAS_CORETYPE to the family the CPU's
instruction set calls for (`cpu_family`: what an OpenBLAS that knows the CPU picks, e.g. Zen on a Zen 3) just for
the import of faiss, which loads that library, and restores the environment at once. NumPy's own OpenBLAS is
loaded before (it reads the variable at its own load only), so its choice does not change. A variable the user
set is left alone. `faiss_blas` says which family FAISS's OpenBLAS chose. Where faiss was imported before
(a plain `import faiss` in a notebook or a test), its library runs the kernels chosen then, whose products
differ from a fresh `cli.py score` process's in the last bits: `import_faiss` warns once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np  # noqa: F401  (NumPy's OpenBLAS loaded, and its kernels chosen, before the variable is set)
from threadpoolctl import ThreadpoolController

CORETYPE = "OPENBLAS_CORETYPE"
log = logging.getLogger(__name__)

# OpenBLAS's x86 families by the widest vector instructions their kernels use: 3 AVX-512, 2 AVX2, 1 AVX
# (the rest, 0, are SSE-era kernels)
LEVELS = {
    **dict.fromkeys(("skylakex", "cooperlake", "sapphirerapids"), 3),
    **dict.fromkeys(("haswell", "zen", "excavator"), 2),
    **dict.fromkeys(("sandybridge", "bulldozer", "piledriver", "steamroller"), 1),
}


@dataclass(frozen=True)
class BlasKernels:
    """The OpenBLAS of FAISS's wheel as loaded in this process."""

    path: str
    """The library file."""
    family: str
    """The kernel family it runs (`openblas_get_corename`), e.g. Haswell, SkylakeX, Prescott."""
    config: str
    """`openblas_get_config`: version and build options."""

    @property
    def current(self) -> bool:
        """Whether the family uses the widest instructions this CPU has (False: it fell back to older ones)."""
        want = cpu_level()
        return want is None or LEVELS.get(self.family.lower(), 0) >= want


@functools.cache
def _cpu() -> tuple[str, set[str]] | None:
    """(vendor, flags) of the first CPU in /proc/cpuinfo; None off Linux x86."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def cpu_level() -> int | None:
    """The widest vector instructions this CPU has, as in LEVELS (None: not known here)."""
    cpu = _cpu()
    if cpu is None:
        return None
    flags = cpu[1]
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return 3
    if {"avx2", "fma"} <= flags:
        return 2
    return 1 if "avx" in flags else 0


def cpu_family() -> str | None:
    """The OpenBLAS family this CPU's instruction set calls for (None: leave OpenBLAS's own choice)."""
    level = cpu_level()
    if level == 3:
        return "SkylakeX"
    if level == 2:
        return "Zen" if _cpu()[0] == "AuthenticAMD" else "Haswell"
    return "Sandybridge" if level == 1 else None


def import_faiss() -> ModuleType:
    """`import faiss`, with OPENBLAS_CORETYPE set to `cpu_family()` while it loads its OpenBLAS unless the user
    set it; os.environ is as before afterwards. Raises ImportError when faiss is not installed."""
    if "faiss" in sys.modules:  # loaded already (None there: not importable, import_module raises)
        faiss = importlib.import_module("faiss")
        _warn_if_loaded_elsewhere(faiss)
        return faiss
    before = os.environ.get(CORETYPE)
    family = cpu_family() if not before else None
    if family is None:
        return importlib.import_module("faiss")
    os.environ[CORETYPE] = family
    try:
        return importlib.import_module("faiss")
    finally:
        if before is None:
            del os.environ[CORETYPE]
        else:
            os.environ[CORETYPE] = before


@functools.cache
def _warn_if_loaded_elsewhere(faiss: ModuleType) -> None:
    """Warn (once) where faiss's OpenBLAS runs other kernels than `import_faiss` would have chosen: faiss was
    imported before, plainly, with no OPENBLAS_CORETYPE set."""
    family = cpu_family()
    kernels = None if family is None or os.environ.get(CORETYPE) else loaded_kernels(faiss)
    if kernels is not None and kernels.family.lower() != family.lower():
        log.warning("faiss was imported before the scoring: its OpenBLAS runs %s kernels, not %s as a fresh "
                    "`cli.py score` chooses, so --backend faiss is slower and its scores differ in the last bits; "
                    "import pipeline.scoring.faiss_blas.import_faiss before faiss, or use a fresh process",
                    kernels.family, family)  # fmt: skip


def _library(faiss: ModuleType) -> Path | None:
    """The OpenBLAS file of faiss's wheel (in `faiss_cpu.libs` beside the package, or in the package)."""
    pkg = Path(faiss.__file__).parent
    for d in (pkg.parent / "faiss_cpu.libs", pkg.parent / "faiss.libs", pkg):
        found = sorted(d.glob("libopenblas*.so*")) if d.is_dir() else []
        if found:
            return found[0]
    return None


def loaded_kernels(faiss: ModuleType) -> BlasKernels | None:
    """The kernels of the OpenBLAS that the imported `faiss` brought (None: it brings none of its own, e.g. a
    conda build on MKL)."""
    path = _library(faiss)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))  # the copy faiss loaded (same file, same handle)
    lib.openblas_get_corename.restype = lib.openblas_get_config.restype = ctypes.c_char_p
    return BlasKernels(str(path), lib.openblas_get_corename().decode(), lib.openblas_get_config().decode())


def faiss_blas() -> BlasKernels | None:
    """The kernels of FAISS's own OpenBLAS, imported through `import_faiss` (None: faiss is not installed or
    brings no OpenBLAS of its own)."""
    try:
        return loaded_kernels(import_faiss())
    except ImportError:
        return None


@contextlib.contextmanager
def faiss_single_threaded() -> Iterator[None]:
    """FAISS's own OpenBLAS limited to one thread inside (NumPy's: `blockmath.single_threaded_blas`); the limit
    before restored after. Nothing happens where faiss brings no OpenBLAS of its own. This acts on a pthreads
    build; an OpenMP build (faiss-cpu 1.15's `libopenblaso`) follows the calling thread's OpenMP setting instead,
    which `FaissTiles` sets to one in each product thread."""
    path = _library(import_faiss())
    same = [] if path is None else [c for c in ThreadpoolController().lib_controllers
                                    if os.path.realpath(c.filepath) == os.path.realpath(path)]  # fmt: skip
    limiter = ThreadpoolController._from_controllers(same).limit(limits=1) if same else None
    try:
        yield
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
