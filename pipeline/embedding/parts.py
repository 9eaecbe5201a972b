"""The part files of an `embed` run under torchrun: one per rank, reused by --resume, joined by rank 0."""

from __future__ import annotations

from pathlib import Path

import h5py

from pipeline.embedding.cohort import Cohort, finish_store
from pipeline.store.writer import StoreWriter, differing_settings

ASSEMBLY_ROWS = 65536  # rows copied at a time when rank 0 joins the parts (bounded memory)


def part_path(out: Path, rank: int, world_size: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}-of-{world_size}")


def assemble(
    out: Path,
    parts: list[Path],
    n: int,
    dim: int,
    identity: dict,
    arrays: dict,
    extra: dict,
    dtype: str,
    cohort: Cohort | None = None,
) -> None:
    """Rank 0: copy the ranks' parts, in order, into one store (with the score offsets of `cohort`); the parts
    are removed afterwards."""
    writer = StoreWriter(out, n, dim, {**identity, "rows": f"0:{n}"}, arrays, dtype)
    try:
        bad: list[int] = []
        for part in parts:
            with h5py.File(part, "r") as f:
                emb = f["embeddings"]
                for a in range(0, len(emb), ASSEMBLY_ROWS):
                    writer.write(writer.rows_done, emb[a : a + ASSEMBLY_ROWS])
                bad += [int(r) for r in f.attrs.get("bad_rows", [])]
        finish_store(writer, {**extra, "bad_rows": bad}, cohort, drop_rows=bad)
    except BaseException:
        writer.close()
        raise
    for part in parts:
        part.unlink()


def complete_part(path: Path, identity: dict) -> bool:
    """A rank's finished part from an earlier run with the same settings (reused by --resume)."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return not differing_settings(f, identity)
    except OSError:
        return False
