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
