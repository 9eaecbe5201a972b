"""Device selection, mixed precision, seeding and memory: the one place every stage gets them from."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
import resource
import signal
import sys
import threading
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux gives KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def log_memory(stage: str, **held: int) -> float:
    """Log the peak resident memory after `stage` and the bytes of what the stage holds (`held`: name -> bytes,
    e.g. `images=bank.nbytes`); `cli.py bench memory` reads these lines. Returns the peak, MiB."""
    peak = peak_rss_mib()
    parts = "".join(f", {k} {v / 2**20:.0f} MiB" for k, v in held.items())
    log.info("memory after %s: peak RSS %.0f MiB%s", stage, peak, parts)
    return peak


def keep_freed_memory() -> None:
    """glibc maps every allocation above 32 MB (a batch of convolution activations) fresh from the OS and unmaps it
    when freed, so each batch faults in zeroed pages again (measured: docs/finetuning.md#timings). Serve large
    blocks from the heap and keep freed memory for the next batch (glibc only; elsewhere nothing changes). Freed
    memory is not given back until exit."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def give_back_freed_memory() -> None:
    """Return the heap's free memory to the system (glibc's malloc_trim; elsewhere nothing): at the end of a stage
    whose freed memory `keep_freed_memory` kept, so the next stage starts from what is still held."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU. An explicit `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise PipelineError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (float16 autocast); on the CPU bfloat16 autocast if `cpu_bf16`, else float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if enabled and cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reproducible_kernels(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Kernels whose results do not depend on the thread count (or so the number of ranks): oneDNN off on
    CPU (its convolutions change summation order with the threads; slower: docs/embedding.md), deterministic cuDNN."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
    return torch.backends.mkldnn.flags(enabled=False)


@contextlib.contextmanager
def repeatable_training(device: torch.device) -> Iterator[None]:
    """Inside, training gives the same weights on every run with the same thread count: torch's deterministic
    algorithms and oneDNN's (two runs of one `finetune` command ended with weights up to 0.039 apart without
    them; with oneDNN's alone, under bfloat16 autocast, still 2.4e-5: docs/finetuning.md#runs-that-repeat), cuDNN
    without autotuning on CUDA. The previous settings are restored on leaving."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    onednn = torch.backends.mkldnn.deterministic  # set alone: its flags() also sets TF32, with a warning
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    torch.backends.mkldnn.deterministic = True
    cuda = device.type == "cuda"
    try:
        with (
            torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
            if cuda
            else contextlib.nullcontext()
        ):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.mkldnn.deterministic = onednn


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch generator seeded the same way for samplers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM unwinds like Ctrl-C, so a stage closes its files and keeps its progress for
    --resume; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def full_float32(device: torch.device):
    """Full float32 products on CUDA (no TF32) inside; nothing changes on other devices."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
