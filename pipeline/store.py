"""The HDF5 embedding store: layout, atomic writing (with resume) and reading in row blocks.

Layout (DESIGN.md): /embeddings [N, D] float32|float16 chunked by rows, /labels int64 [N], /identities and
/paths UTF-8 strings, /pairs int64 [P, 2], /pair_labels int8 [P], /pair_folds int8 [P] (pair protocols),
provenance in the root attributes. A store is written to `OUT.partial` and renamed to `OUT` only when
complete, so a file at the output path is always whole.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.outputs import io_cause

log = logging.getLogger(__name__)

STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20


def partial_path(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


OWN_ATTRS = ("rows_done", "complete", "model", "torch_version")
"""Attributes every store that `embed` writes carries: a file without them is not replaced by `--overwrite`."""
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def recognise_store(path: Path | str) -> str | None:
    """None when `path` is an embedding store that `embed` wrote; else what is there."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    try:
        with h5py.File(path, "r") as f:
            missing = [a for a in OWN_ATTRS if a not in f.attrs]
    except OSError:
        return "it is not a readable HDF5 file"
    return f"it is an HDF5 file without embed's attributes {missing}" if missing else None


def recognise_partial(path: Path | str) -> str | None:
    """None when `path` (an OUT.partial) is an HDF5 file, as the partial stores of `embed` are (a killed run's
    may be unreadable); else what is there."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    with open(path, "rb") as f:
        return None if f.read(8) == HDF5_SIGNATURE else "it is not an HDF5 file"


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

    def finish(self, extra_attrs: dict | None = None, drop_rows: list[int] | None = None) -> Path:
        """Mark complete and rename to the output path; `drop_rows` (bad images) are removed first."""
        if self.rows_done != self.n:
            raise RuntimeError(f"store has {self.rows_done} of {self.n} rows")
        f = self.file
        with self._writing():
            del self.embeddings
            f.attrs.update({k: _attr(v) for k, v in (extra_attrs or {}).items()})
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = True
            f.close()
            if drop_rows:
                _drop_rows(self.partial, drop_rows)
            os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def differing_settings(f: h5py.File, identity: dict) -> list[str]:
    """The identity attributes whose stored value differs from `identity` (empty: same content)."""
    return [k for k, v in identity.items() if k not in f.attrs or _attr(f.attrs[k]) != _attr(v)]


def _attr(v):
    """Attributes as HDF5 stores them (None -> '', paths -> str), for writing and for comparing."""
    if v is None:
        return ""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _drop_rows(path: Path, drop: list[int]) -> None:
    """Rewrite a store in place without rows `drop`, re-indexing pairs (pairs using a dropped row go)."""
    tmp = path.with_name(path.name + ".compact")
    try:
        _copy_without(path, tmp, drop)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_without(path: Path, tmp: Path, drop: list[int]) -> None:
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        n = src["embeddings"].shape[0]
        keep = np.setdiff1d(np.arange(n), np.asarray(drop, dtype=np.int64))
        emb = src["embeddings"]
        dst.create_dataset(
            "embeddings", data=emb[...][keep], chunks=(min(max(len(keep), 1), emb.chunks[0]), emb.shape[1])
        )
        dst.create_dataset("labels", data=src["labels"][...][keep])
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


def recorded_data_root(path: Path | str) -> str | None:
    """The data root a store was embedded from (its `data_root` attribute), or None."""
    try:
        with h5py.File(path, "r") as f:
            return str(_attr(f.attrs.get("data_root", ""))) or None
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class Store:
    """An open store. `embeddings` stays on disk (h5py dataset); read it in row blocks with `rows`."""

    path: Path
    file: h5py.File
    embeddings: h5py.Dataset
    labels: np.ndarray | None
    attrs: dict

    @property
    def n(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (float16 stores are widened)."""
        return np.asarray(self.embeddings[start:stop], dtype=np.float32)

    def strings(self, name: str) -> list[str]:
        return (
            [s.decode() if isinstance(s, bytes) else str(s) for s in self.file[name][...]] if name in self.file else []
        )

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pairs [P,2], pair_labels [P] 1 = same, pair_folds [P]); an error when the store has none."""
        if "pairs" not in self.file:
            raise PipelineError(
                f"{self.path} holds no pairs: it was embedded with --protocol {self.attrs.get('protocol', '?')}. "
                f"Embed with --protocol pairs or 10fold, or score it with --all-pairs."
            )
        f = self.file
        folds = f["pair_folds"][...] if "pair_folds" in f else np.zeros(len(f["pairs"]), dtype=np.int8)
        return f["pairs"][...].astype(np.int64), f["pair_labels"][...].astype(np.int8), folds.astype(np.int8)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def integer_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """A store's /labels as int64 identities: integers (or floats without fractions) >= 0, one per row; floats
    with fractions, strings and negative values are refused, never truncated."""
    raw = np.asarray(raw)
    if raw.ndim != 1:
        raise PipelineError(f"{path}: /labels has shape {raw.shape}; it must be one integer per row")
    if raw.dtype.kind in "iub":
        labels = raw.astype(np.int64)
    elif raw.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if len(bad):
            raise PipelineError(
                f"{path}: /labels are floats with fractions or NaN (row {bad[0]}: {raw[bad[0]]!r}, {len(bad)} rows in "
                f"all); labels must be integer identities: write e.g. np.unique(labels, return_inverse=True)[1]"
            )
        labels = raw.astype(np.int64)
    else:
        raise PipelineError(
            f"{path}: /labels has type {raw.dtype}; labels must be integer identities (names go to /identities)"
        )
    if len(labels) and labels.min() < 0:
        raise PipelineError(f"{path}: /labels holds negative values (row {int(np.argmin(labels))}); use indices >= 0")
    return labels


def bad_rows_error(store: Store, bad: list[int]) -> PipelineError:
    """NaN or infinite rows, named by row and image path (the first ten)."""
    paths = store.strings("paths")
    named = [f"{r} ({paths[r]})" if r < len(paths) else str(r) for r in bad[:10]]
    return PipelineError(
        f"{store.path}: {len(bad)} rows hold NaN or infinite values: rows {', '.join(named)}"
        f"{' ...' if len(bad) > 10 else ''}. Re-embed those images (check the weights) or drop them."
    )


def open_store(path: Path | str, need_labels: bool = True) -> Store:
    """Open a store for reading; a missing, truncated, incomplete or malformed file is a PipelineError."""
    path = Path(path)
    if not path.is_file():
        hint = (
            f" A partial file {partial_path(path)} exists: finish it with `embed ... --resume`."
            if partial_path(path).exists()
            else ""
        )
        raise PipelineError(f"store {path} does not exist.{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PipelineError(
            f"{path} is not a readable HDF5 file (truncated or corrupt?): {e}. Re-create it with `embed`."
        ) from e
    try:
        if "embeddings" not in f or len(f["embeddings"].shape) != 2:
            raise PipelineError(f"{path} has no 2-d /embeddings dataset: it is not an embedding store")
        if not f.attrs.get("complete", True):
            raise PipelineError(
                f"{path} is incomplete (rows_done={f.attrs.get('rows_done')}): finish it with `embed --resume`"
            )
        labels = integer_labels(f["labels"][...], path) if "labels" in f else None
        if need_labels and labels is None:
            raise PipelineError(f"{path} has no /labels: scoring needs the identity of each row")
        n = f["embeddings"].shape[0]
        for name in ("labels", "paths"):
            if name in f and len(f[name]) != n:
                raise PipelineError(
                    f"{path}: /{name} has {len(f[name])} rows but /embeddings {n}: the store is damaged"
                )
    except Exception:
        f.close()
        raise
    return Store(path, f, f["embeddings"], labels, {k: _attr(v) for k, v in f.attrs.items()})
