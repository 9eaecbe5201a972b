"""Writing a store: rows filled in order into `OUT.partial` (resumable), renamed to `OUT` when complete, so a
file at the output path is always whole. Layout and reading: `pipeline.store.layout`."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.outputs import io_cause
from pipeline.store.layout import CHUNK_BYTES, STR, _attr, partial_path, recognise_partial

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    import torch
    import torchvision

    return {
        "python_version": platform.python_version(),
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "h5py_version": h5py.__version__,
        "numpy_version": np.__version__,
    }


def chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (dim * itemsize))


class StoreWriter:
    """Fill a store's rows in order into `OUT.partial`; `finish` renames it to `OUT`.

    `identity` holds the attributes that define the content (model, weights, data, ...): `resume=True`
    continues a partial file only when they are equal, so a resumed store equals an uninterrupted one.
    """

    def __init__(
        self,
        out: Path | str,
        n: int,
        dim: int,
        identity: dict,
        arrays: dict[str, np.ndarray | list[str]],
        dtype: str = "float32",
        resume: bool = False,
    ):
        self.out, self.partial = Path(out), partial_path(out)
        self.n, self.dim = n, dim
        reopened = self._reopen(identity) if resume and self.partial.exists() else None
        self.file = reopened or self._create(n, dim, dtype, identity, arrays)
        # one handle for all writes: a temporary handle per write would flush (and fail) as it is freed
        self.embeddings = self.file["embeddings"]

    @property
    def rows_done(self) -> int:
        return int(self.file.attrs["rows_done"])

    def _write_error(self, e: BaseException, f: h5py.File | None) -> PipelineError:
        """A failed write (full disk, file size limit, read-only or forbidden folder: h5py raises OSError or
        RuntimeError) as one PipelineError naming the file and the cause; the file is closed first."""
        err = PipelineError(
            f"cannot write {self.partial}: {io_cause(e)}. Rows written before are kept there: make room (or lift "
            f"the limit) and rerun with --resume"
        )
        if f is not None:
            try:
                f.close()
            except Exception:
                err.hard_exit = True
        return err

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except (OSError, RuntimeError) as e:
            raise self._write_error(e, self.file) from None

    def _create(self, n: int, dim: int, dtype: str, identity: dict, arrays: dict) -> h5py.File:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        f = None
        try:
            f = h5py.File(self.partial, "w", locking=False)  # our own lock guards it; HDF5's would pass to workers
            return self._fill_new(f, n, dim, dtype, identity, arrays)
        except (OSError, RuntimeError) as e:
            raise self._write_error(e, f) from None

    def _fill_new(self, f: h5py.File, n: int, dim: int, dtype: str, identity: dict, arrays: dict) -> h5py.File:
        itemsize = np.dtype(dtype).itemsize
        f.create_dataset("embeddings", (n, dim), dtype=dtype, chunks=(min(max(n, 1), chunk_rows(dim, itemsize)), dim))
        for name, value in arrays.items():
            if value is None:
                continue
            if isinstance(value, list):
                f.create_dataset(name, data=np.array(value, dtype=object), dtype=STR)
            else:
                f.create_dataset(name, data=value)
        f.attrs.update({k: _attr(v) for k, v in identity.items()})
        f.attrs.update(library_versions())
        f.attrs["rows_done"] = 0
        f.attrs["complete"] = False
        f.flush()
        return f

    def _reopen(self, identity: dict) -> h5py.File | None:
        """The partial file to continue, or None when it is unreadable (a run killed while writing HDF5's
        metadata): then it is started over, as embed's rows are the same whenever they are computed."""
        try:
            f = h5py.File(self.partial, "r+", locking=False)
            int(f.attrs["rows_done"])
        except (OSError, KeyError) as e:
            reason = recognise_partial(self.partial)
            if reason is not None:
                raise PipelineError(f"cannot resume from {self.partial}: {reason}. Move it away.") from e
            log.warning("%s is unreadable (%s; killed while writing?): starting over", self.partial, e)
            return None
        differ = differing_settings(f, identity)
        if differ:
            f.close()
            raise PipelineError(
                f"cannot resume from {self.partial}: it was started with other settings ({', '.join(differ)}). "
                f"Rerun without --resume to start over, or with the same settings."
            )
        return f

    def set_attrs(self, attrs: dict) -> None:
        """Attributes that go with the next rows (written with them by `write`'s flush)."""
        with self._writing():
            self.file.attrs.update(attrs)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write rows [start, start+len(rows)); only contiguous progress from `rows_done` is allowed."""
        if start != self.rows_done:
            raise RuntimeError(f"rows must be written in order: expected start {self.rows_done}, got {start}")
        with self._writing():
            self.embeddings[start : start + len(rows)] = rows
            self.file.attrs["rows_done"] = start + len(rows)
            self.file.flush()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (in the store's dtype), of those written so far."""
        if stop > self.rows_done:
            raise RuntimeError(f"rows {start}:{stop} asked, {self.rows_done} written")
        with self._writing():
            return self.embeddings[start:stop]

    def finish(
        self,
        extra_attrs: dict | None = None,
        drop_rows: list[int] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> Path:
        """Mark complete and rename to the output path. `arrays` are per-row datasets written beside the
        embeddings (the score offsets, `pipeline.store.layout.OFFSETS`); `drop_rows` (bad images) are then
        removed from the embeddings and from them."""
        if self.rows_done != self.n:
            raise RuntimeError(f"store has {self.rows_done} of {self.n} rows")
        arrays = arrays or {}
        if any(len(v) != self.n for v in arrays.values()):
            raise RuntimeError(f"per-row arrays must have {self.n} rows")
        f = self.file
        with self._writing():
            for name, values in arrays.items():
                if name in f:  # a resumed file killed while finishing
                    del f[name]
                f.create_dataset(name, data=values)
            del self.embeddings
            f.attrs.update({k: _attr(v) for k, v in (extra_attrs or {}).items()})
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = True
            f.close()
            if drop_rows:
                _drop_rows(self.partial, drop_rows, list(arrays))
            os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def differing_settings(f: h5py.File, identity: dict) -> list[str]:
    """The identity attributes whose stored value differs from `identity` (empty: same content)."""
    return [k for k, v in identity.items() if k not in f.attrs or _attr(f.attrs[k]) != _attr(v)]


def _drop_rows(path: Path, drop: list[int], row_arrays: list[str]) -> None:
    """Rewrite a store in place without rows `drop` (of the embeddings, labels, paths and the per-row
    `row_arrays`), re-indexing pairs (pairs using a dropped row go)."""
    tmp = path.with_name(path.name + ".compact")
    try:
        _copy_without(path, tmp, drop, row_arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_without(path: Path, tmp: Path, drop: list[int], row_arrays: list[str]) -> None:
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        n = src["embeddings"].shape[0]
        keep = np.setdiff1d(np.arange(n), np.asarray(drop, dtype=np.int64))
        emb = src["embeddings"]
        dst.create_dataset(
            "embeddings", data=emb[...][keep], chunks=(min(max(len(keep), 1), emb.chunks[0]), emb.shape[1])
        )
        dst.create_dataset("labels", data=src["labels"][...][keep])
        for name in row_arrays:
            dst.create_dataset(name, data=src[name][...][keep])
        dst.create_dataset("identities", data=src["identities"][...], dtype=STR)
        paths = src["paths"][...]
        dst.create_dataset("paths", data=paths[keep], dtype=STR)
        dst.create_dataset("skipped_paths", data=paths[np.asarray(drop, dtype=np.int64)], dtype=STR)
        if "pairs" in src:
            new_index = np.full(n, -1, dtype=np.int64)
            new_index[keep] = np.arange(len(keep))
            mapped = new_index[src["pairs"][...]]
            ok = (mapped >= 0).all(axis=1)
            dst.create_dataset("pairs", data=mapped[ok])
            dst.create_dataset("pair_labels", data=src["pair_labels"][...][ok])
            dst.create_dataset("pair_folds", data=src["pair_folds"][...][ok])
        dst.attrs.update(dict(src.attrs))
        dst.attrs["n_skipped_bad"] = len(drop)
        dst.attrs["rows_done"] = len(keep)
