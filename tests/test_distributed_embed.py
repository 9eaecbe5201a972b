"""`embed` under torchrun (2 gloo processes on the CPU) equals the single-process store; a failing rank
fails the run with its message and leaves no store at the output path."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.distributed import split_range
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.faces import lfw
from tests.torchrun import torchrun


def embed_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "embed",
        "--data-root",
        str(root),
        "--weights",
        "none",
        "--workers",
        "0",
        "--batch-size",
        "3",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("n,parts", [(10, 2), (3, 4), (0, 3), (7, 7)])
def test_split_range_covers_evenly(n, parts):
    pieces = [split_range(n, parts, k) for k in range(parts)]
    assert [i for p in pieces for i in p] == list(range(n))
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_two_ranks_give_the_single_process_store(tiny_lfw, tmp_path):
    """--deterministic: the ranks run with 1 thread each, the single process with the default threads."""
    single = embed(
        EmbedConfig(
            out=tmp_path / "one.h5",
            data_root=tiny_lfw,
            weights="none",
            workers=0,
            batch_size=3,
            protocol="pairs",
            deterministic=True,
        )
    )
    result = torchrun(2, *embed_args(tiny_lfw, tmp_path / "two.h5", "--protocol", "pairs", "--deterministic"))
    assert result.returncode == 0, result.stderr[-3000:]
    with h5py.File(single, "r") as a, h5py.File(tmp_path / "two.h5", "r") as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k][...], b[k][...], err_msg=k)
        assert b.attrs["world_size"] == 2 and a.attrs["world_size"] == 1
    assert sorted(p.name for p in tmp_path.glob("*.h5*")) == ["one.h5", "two.h5"]  # parts removed


def test_failing_rank_fails_the_run_without_store(tiny_lfw, tmp_path):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")
    bad = proto.absolute(len(proto) - 1)  # in the last rank's shard
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "two.h5"
    result = torchrun(2, *embed_args(tiny_lfw, out))
    assert result.returncode != 0
    assert bad.name in result.stderr and "--skip-bad" in result.stderr
    assert not out.exists()
