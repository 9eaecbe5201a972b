"""The HDF5 embedding store: layout, atomic writing (with resume) and reading in row blocks.

Layout (DESIGN.md): /embeddings [N, D] float32|float16 chunked by rows, /labels int64 [N], /identities and
/paths UTF-8 strings, /pairs int64 [P, 2], /pair_labels int8 [P], /pair_folds int8 [P] (pair protocols),
optional /score_offsets float32 [N] (cohort score normalisation), provenance in the root attributes. A store is
written to `OUT.partial` and renamed to `OUT` only when complete, so a file at the output path is always whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20


def partial_path(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


OFFSETS = "score_offsets"
"""Optional dataset [N] float32: per-row score offsets (cohort score normalisation, `pipeline.embedding.cohort`). With it,
the cosine score of rows i, j is cos(x_i, x_j) - o_i - o_j."""
SCORE_NORM = "score_norm"
"""The attribute that describes the offsets (which cohort, how many of its most similar images)."""

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
    offsets: np.ndarray | None = None
    """The store's score offsets (`OFFSETS`, float32 [N]), or None."""

    @property
    def n(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (float16 stores are widened)."""
        return np.asarray(self.embeddings[start:stop], dtype=np.float32)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows [start, stop) as float32 into rows [start, stop) of `out` (C-contiguous float32 [n, dim]), straight
        from HDF5 (no intermediate array); returns those rows."""
        if stop > start:
            self.embeddings.read_direct(out, source_sel=np.s_[start:stop], dest_sel=np.s_[start:stop])
        return out[start:stop]

    def strings(self, name: str) -> list[str]:
        return (
            [s.decode() if isinstance(s, bytes) else str(s) for s in self.file[name][...]] if name in self.file else []
        )

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pairs [P,2], pair_labels [P] 1 = same, pair_folds [P]); an error when the store has none."""
        if "pairs" not in self.file:
            raise PipelineError(
                f"{self.path} holds no pairs: it was embedded with --protocol {self.attrs.get('protocol', '?')}. "
                f"Embed with --protocol pairs or 10fold (--dataset folder with --pairs-file, or --dataset bin), or score it "
                f"with --all-pairs."
            )
        f = self.file
        folds = f["pair_folds"][...] if "pair_folds" in f else np.zeros(len(f["pairs"]), dtype=np.int8)
        return f["pairs"][...].astype(np.int64), f["pair_labels"][...].astype(np.int8), folds.astype(np.int8)

    def score_offsets(self, metric: str, use: bool = True) -> np.ndarray | None:
        """The offsets to subtract from scores under `metric` (None: plain scores). Offsets go with cosine: l2 on
        a store with offsets is an error unless `use` is False (`score --no-score-norm`)."""
        if self.offsets is None or not use:
            return None
        if metric != "cosine":
            raise PipelineError(
                f"{self.path} holds score offsets ({self.score_norm}), which go with --metric cosine: score it with "
                f"--metric cosine, or add --no-score-norm to score plain {metric} distances"
            )
        return self.offsets

    @property
    def score_norm(self) -> str:
        """What the offsets are: the store's `SCORE_NORM` attribute (the dataset's name when it has none)."""
        return str(self.attrs.get(SCORE_NORM) or OFFSETS)

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
        offsets = read_offsets(f, path, n)
    except Exception:
        f.close()
        raise
    return Store(path, f, f["embeddings"], labels, {k: _attr(v) for k, v in f.attrs.items()}, offsets)


def read_offsets(f: h5py.File, path: Path, n: int) -> np.ndarray | None:
    """/score_offsets as float32 [n], or None when absent; any other shape or type, or NaN or infinite values, is
    a PipelineError."""
    if OFFSETS not in f:
        return None
    redo = "the store is damaged or was written by another tool; re-embed it (with its cohort)"
    ds = f[OFFSETS]
    if not isinstance(ds, h5py.Dataset) or ds.shape != (n,) or ds.dtype.kind not in "fiu":
        what = f"type {ds.dtype} and shape {ds.shape}" if isinstance(ds, h5py.Dataset) else "a group"
        raise PipelineError(
            f"{path}: /{OFFSETS} is {what}; it must hold one number per row of /embeddings ({n}): {redo}"
        )
    offsets = np.asarray(ds[...], dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(offsets))
    if len(bad):
        raise PipelineError(
            f"{path}: /{OFFSETS} holds NaN or infinite values (row {bad[0]}, {len(bad)} rows in all): {redo}"
        )
    return offsets
