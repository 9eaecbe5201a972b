"""A store's rows in label order, for out-of-core scoring (`pipeline.scoring.rows`) of a store in any row order.

In-memory scoring sorts the rows by label (stable) before its tiles; out-of-core scoring must multiply the same
rows in the same order to give the same bits. A store sorted by label (as `embed` writes it) is read in place.
Any other store is first copied, in label order, into a temporary file of raw rows (the store's dtype, N x D),
in bounded memory: the store is read in blocks of `COPY_ROWS` rows and each block is scattered to its sorted
places through a short-lived memory map. The file is unlinked as soon as it is opened, so nothing is left
behind, even by a killed run; its folder is `TMPDIR` (default /tmp), which needs room for N x D x itemsize
bytes (checked first).
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.outputs import io_cause
from pipeline.store.layout import Store

log = logging.getLogger(__name__)

COPY_ROWS = 1 << 14  # rows scattered per memory map: at most this many pages of the copy are resident at once


def label_order(labels: np.ndarray) -> np.ndarray | None:
    """Sorted position -> store row (a stable sort by label); None when the labels are sorted already (stores
    of `embed` are sorted by person)."""
    return None if not (np.diff(labels) < 0).any() else np.argsort(labels, kind="stable")


class LabelOrder:
    """The rows of `store` in label order: `rows(s, e)` of sorted positions, `take(positions)`, the sorted
    `labels`, and `store_rows` (sorted position -> store row). Close it to release the temporary copy."""

    def __init__(self, store: Store, tmp_dir: str | None = None, progress: bool = True,
                 order: np.ndarray | None = None):  # fmt: skip
        """`order`: `label_order(store.labels)` when known."""
        self.store, self.n, self.dim = store, store.n, store.dim
        labels = store.labels
        self.fd = -1
        self.order = label_order(labels) if order is None else order
        if self.order is None:
            self.labels = labels
            return
        self.labels = labels[self.order]
        self.dtype = np.dtype(store.embeddings.dtype)
        self._copy(tmp_dir or tempfile.gettempdir(), progress)

    def _copy(self, folder: str, progress: bool) -> None:
        size = self.n * self.dim * self.dtype.itemsize
        free = shutil.disk_usage(folder).free
        if free < size + (64 << 20):
            raise PipelineError(
                f"{self.store.path}: its rows are not sorted by label, and out-of-core scoring sorts them into a "
                f"temporary copy of {size / 2**30:.2f} GiB in {folder}, which has {free / 2**30:.2f} GiB free. "
                f"Set TMPDIR to a folder with room, or rewrite the store sorted by label."
            )
        log.info("rows not sorted by label: copying them in label order to a temporary file (%.2f GiB)", size / 2**30)
        fd, path = tempfile.mkstemp(prefix="lfw-sorted-", suffix=".rows", dir=folder)
        os.unlink(path)  # the open descriptor keeps the data; nothing remains once it is closed or the run dies
        self.fd = fd
        try:
            os.ftruncate(fd, size)
            dest = np.empty(self.n, dtype=np.int64)
            dest[self.order] = np.arange(self.n)
            with tqdm(total=self.n, unit="row", unit_scale=True, disable=not progress, mininterval=1.0,
                      desc="sorting rows") as bar:  # fmt: skip
                for s in range(0, self.n, COPY_ROWS):
                    e = min(s + COPY_ROWS, self.n)
                    block = self.store.embeddings[s:e]
                    mm = mmap.mmap(fd, size)
                    np.ndarray((self.n, self.dim), dtype=self.dtype, buffer=mm)[dest[s:e]] = block
                    mm.close()  # unmapped: its pages leave this process's resident memory
                    bar.update(e - s)
        except OSError as e:
            self.close()
            raise PipelineError(
                f"cannot write the temporary sorted copy of {self.store.path} in {folder}: {io_cause(e)}. Set TMPDIR "
                f"to a folder with room, or rewrite the store sorted by label."
            ) from e

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Sorted positions [start, stop) as float32."""
        if self.order is None:
            return self.store.rows(start, stop)
        buf = np.empty((stop - start, self.dim), dtype=self.dtype)
        row = self.dim * self.dtype.itemsize
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], start * row + done)
            if got <= 0:
                raise PipelineError(f"internal error: the temporary sorted copy of {self.store.path} is short")
            done += got
        return buf.astype(np.float32, copy=False)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at increasing sorted `positions` (few: the bin-range sample) as float32."""
        if self.order is None:
            return np.asarray(self.store.embeddings[positions], dtype=np.float32)
        return np.concatenate(
            [self.rows(int(p), int(p) + 1) for p in positions] or [np.empty((0, self.dim), np.float32)]
        )

    def store_rows(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self.order is None else self.order[positions]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LabelOrder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
