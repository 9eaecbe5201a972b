"""torch.distributed under `torchrun`: which rank this process is, and how work splits across ranks.

Without torchrun (no WORLD_SIZE > 1 in the environment) everything here is a no-op single process, so
stages call it unconditionally. gloo on CPU, NCCL on CUDA; no home-made process pools or sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (once); returns the world and this rank's device
    (`cuda:LOCAL_RANK` on GPUs)."""
    if not launched():
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def split_range(n: int, parts: int, k: int) -> range:
    """Part k of `parts` contiguous, balanced (sizes differ by at most one) pieces of range(n)."""
    base, extra = divmod(n, parts)
    start = k * base + min(k, extra)
    return range(start, start + base + (1 if k < extra else 0))


def all_reduce_sum(counts: np.ndarray) -> np.ndarray:
    """Element-wise sum over the ranks of an int64 array (every rank gets it); unchanged single process.
    gloo sums int64 exactly; on NCCL the array goes through the current CUDA device."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    t = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_gather_rows(row: list[float]) -> list[list[float]]:
    """Every rank's float64 `row` (same length on all ranks), in rank order; [row] single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [list(row)]
    t = torch.tensor(row, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj` (any size; the exact tails of scoring), in rank order; [obj] single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
