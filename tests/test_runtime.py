"""Process-wide run-time settings (`pipeline.runtime`)."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks_without_new_page_faults():
    from pipeline.runtime import keep_freed_memory

    def faults_of_a_new_64mb_array() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = np.ones(16 << 20, dtype=np.float32)  # 64 MB, above glibc's mmap ceiling
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    keep_freed_memory()
    faults_of_a_new_64mb_array()
    # mapped afresh, every array faults in its pages again: 16,384 (4 kB pages) or 32 huge pages and their tables
    assert faults_of_a_new_64mb_array() < 16


def test_repeatable_training_sets_deterministic_kernels_and_restores_them():
    import torch

    from pipeline.runtime import repeatable_training

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic)
    with repeatable_training(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.mkldnn.deterministic
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic) == before
    with pytest.raises(RuntimeError), repeatable_training(torch.device("cpu")):
        raise RuntimeError("stopped")  # restored on an error too
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic) == before
