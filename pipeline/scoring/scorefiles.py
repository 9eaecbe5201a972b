"""Score files in and out: another system's scores (bob's 4- and 5-column files and its CSV, pyeer's genuine and
impostor lists, a plain CSV; `.gz` too), read in blocks without torch, and the scores of listed pairs written at
full precision. A malformed line is a PipelineError naming the file and the line, never a skipped row.

Each block of whole lines is split by Python's C `bytes.split`; that every line holds the format's number of
fields is checked with NumPy on the block's bytes (field starts counted between newlines), and the columns become
NumPy arrays: `astype(float64)` for scores, byte-string comparisons for identities."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

FORMATS = ("bob4", "bob5", "bobcsv", "pyeer", "csv")
EXPORTS = ("bob4", "csv")
BLOCK_BYTES = 8 << 20  # bytes read at a time (whole lines)
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
WHITESPACE = {"bob4": (4, 0, 1, 3), "bob5": (5, 0, 2, 4)}
"""format -> (fields per line, claimed identity, real identity, score): same person when the two match."""


@dataclass
class ScoreFile:
    """Scores read from files: float64 values (higher: more alike), same-person flags, and each score's two
    identities as integer codes (None where the format has none)."""

    values: np.ndarray
    same: np.ndarray
    ids: tuple[np.ndarray, np.ndarray] | None = None


class Identities:
    """Integer codes of identity names, the same across blocks."""

    def __init__(self):
        self.codes: dict[bytes, int] = {}

    def __call__(self, names: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(names, return_inverse=True)
        table = np.array([self.codes.setdefault(bytes(u), len(self.codes)) for u in uniq], dtype=np.int32)
        return table[inverse]


def _open(path: Path):
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise PipelineError(f"cannot read score file {path}: {e}") from None


def blocks(path: Path, size: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block of whole lines ending in a newline) over the file."""
    line, carry = 1, b""
    with _open(path) as f:
        try:
            while chunk := f.read(size):
                chunk = carry + chunk
                cut = chunk.rfind(b"\n") + 1
                block, carry = chunk[:cut], chunk[cut:]
                if block:
                    yield line, block
                    line += block.count(b"\n")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise PipelineError(f"cannot read score file {path}: {e}") from None
    if carry:
        yield line, carry + b"\n"


def _bad_line(path: Path, first: int, block: bytes, ncols: int | None, score_at: int) -> PipelineError:
    """The error naming the first line of `block` (numbered from `first`) with another number of fields than
    `ncols` (None: any number) or no finite number in field `score_at`."""
    for k, ln in enumerate(block.split(b"\n")):
        fields = ln.split()
        if not fields or fields[0].startswith(b"#"):
            continue
        ncols = ncols or len(fields)
        if len(fields) != ncols or not _is_finite(fields[score_at]):
            shown = ln.strip()[:120].decode(errors="replace")
            return PipelineError(f"{path} line {first + k}: expected {ncols} fields with a finite score, got {shown!r}")
    return PipelineError(f"{path}: a line from line {first} on is malformed")


def _is_finite(s: bytes) -> bool:
    try:
        return bool(np.isfinite(float(s)))
    except ValueError:
        return False


def whitespace_rows(path: Path, ncols: int | None, score_at: int, text: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Per block, the rows of a whitespace-separated file with `ncols` fields per line (None: as many as its first
    line) as a structured array: fields `f<k>`, byte strings for those in `text`, float64 for the score
    (`score_at`); `#` comments and blank lines skipped. NumPy's C `loadtxt` parses each block of whole lines."""
    for first, raw in blocks(path):
        b = np.frombuffer(raw, dtype=np.uint8)
        width = int(np.diff(np.r_[-1, np.flatnonzero(b == 10)]).max())  # no field is longer than a line
        n = ncols or len(
            next((ln.split() for ln in raw.split(b"\n") if ln.split() and not ln.lstrip().startswith(b"#")), [])
        )
        if not n:
            continue
        ncols = n
        at = score_at % n
        dtype = [(f"f{k}", f"S{width}" if k in text else ("f8" if k == at else "V0")) for k in range(n)]
        try:
            rows = np.loadtxt(io.BytesIO(raw), dtype=[d for d in dtype if d[1] != "V0"], comments="#", ndmin=1,
                              usecols=[k for k in range(n) if dtype[k][1] != "V0"])  # fmt: skip
            _check_columns(raw, n)
        except ValueError:
            raise _bad_line(path, first, raw, n, at) from None
        if not np.isfinite(rows[f"f{at}"]).all():
            raise _bad_line(path, first, raw, n, at)
        yield rows


def _check_columns(raw: bytes, n: int) -> None:
    """A ValueError unless every line that is no comment or blank holds n fields (loadtxt reads only the fields
    it is given, and would not see a line with more)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    space = _SPACE[b]
    starts = ~space
    starts[1:] &= space[:-1]
    ends = np.cumsum(starts, dtype=np.int64)[np.flatnonzero(b == 10)]
    counts = np.diff(np.r_[0, ends])
    if b"#" in raw:
        comment = np.array([ln.lstrip().startswith(b"#") for ln in raw.split(b"\n")[: len(counts)]])
        counts = counts[~comment]
    if ((counts != 0) & (counts != n)).any():
        raise ValueError("fields per line")


def read_whitespace(path: Path, fmt: str) -> ScoreFile:
    """bob4 (`claimed_id real_id test_label score`) or bob5 (`claimed_id model_label real_id test_label score`):
    same person when claimed_id equals real_id."""
    ncols, claimed, real, at = WHITESPACE[fmt]
    values, same = [], []
    for rows in whitespace_rows(path, ncols, at, (claimed, real)):
        values.append(rows[f"f{at}"])
        same.append(rows[f"f{claimed}"] == rows[f"f{real}"])
    return _joined(path, values, same, None)


def read_pyeer(genuine: Path, impostor: Path | None) -> ScoreFile:
    """pyeer's lists: every line of `genuine` a same-person score, of `impostor` a different-person one, each in
    the line's last field."""
    if impostor is None:
        raise PipelineError("--format pyeer reads two files: --scores GENUINE --impostor-scores IMPOSTOR")
    parts = []
    for path, same in ((genuine, True), (impostor, False)):
        v = [rows[rows.dtype.names[0]] for rows in whitespace_rows(path, None, -1, ())]
        parts.append((np.concatenate(v) if v else np.zeros(0), same))
    values = np.concatenate([v for v, _ in parts])
    flags = np.concatenate([np.full(len(v), s) for v, s in parts])
    return _joined(genuine, [values], [flags], None)


def read_csv(path: Path, fmt: str) -> ScoreFile:
    """csv (a header with `score` and `same`, 1/0 or true/false, optionally `a` and `b`) or bobcsv (a header with
    `bio_ref_subject_id`, `probe_subject_id` and `score`; other columns are metadata), read by the csv module."""
    names, values, same, a, b = Identities(), [], [], [], []
    want = ("a", "b") if fmt == "csv" else ("bio_ref_subject_id", "probe_subject_id")
    with _open(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        reader = csv.reader(text)
        header = next(reader, None) or []
        at = {k: header.index(k) for k in (*want, "score", "same") if k in header}
        missing = [k for k in (("score", "same") if fmt == "csv" else (*want, "score")) if k not in at]
        if missing:
            raise PipelineError(f"{path} line 1: the header has no {', '.join(missing)} column (it has {header})")
        rows = _csv_rows(path, reader, at, len(header), fmt)
        for chunk in rows:
            values.append(chunk["score"])
            ids = [names(chunk[k]) for k in want if k in chunk]
            same.append(chunk["same"] if fmt == "csv" else ids[0] == ids[1])
            if len(ids) == 2:
                a.append(ids[0])
                b.append(ids[1])
    return _joined(path, values, same, (a, b) if a else None)


def _csv_rows(path: Path, reader, at: dict[str, int], width: int, fmt: str, rows: int = 1 << 16):
    """The csv rows in chunks of `rows`, as arrays per wanted column."""
    chunk: list[list[str]] = []
    for row in reader:
        if len(row) != width:
            if not row:
                continue
            raise PipelineError(f"{path} line {reader.line_num}: {len(row)} fields, the header has {width}")
        chunk.append(row)
        if len(chunk) == rows:
            yield _csv_chunk(path, chunk, at, reader.line_num - len(chunk) + 1)
            chunk = []
    if chunk:
        yield _csv_chunk(path, chunk, at, reader.line_num - len(chunk) + 1)


def _csv_chunk(path: Path, chunk: list[list[str]], at: dict[str, int], first: int) -> dict[str, np.ndarray]:
    cols = {k: np.array([r[i] for r in chunk]) for k, i in at.items()}
    try:
        cols["score"] = cols["score"].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(cols["score"]))
    except ValueError:
        bad = [next(k for k, s in enumerate(cols["score"]) if not _is_finite(s.encode()))]
    if len(bad):
        raise PipelineError(
            f"{path} line {first + bad[0]}: the score {chunk[bad[0]][at['score']]!r} is no finite number"
        )
    if "same" in cols:
        flag = np.char.lower(cols["same"].astype(str))
        ok = np.isin(flag, ("1", "0", "true", "false"))
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise PipelineError(
                f"{path} line {first + k}: same must be 1, 0, true or false, not {chunk[k][at['same']]!r}"
            )
        cols["same"] = np.isin(flag, ("1", "true"))
    for k in ("a", "b", "bio_ref_subject_id", "probe_subject_id"):
        if k in cols:
            cols[k] = np.char.encode(cols[k], "utf-8")
    return cols


def _joined(path: Path, values: list, same: list, ids) -> ScoreFile:
    if not values or not sum(len(v) for v in values):
        raise PipelineError(f"{path} holds no scores")
    joined = ScoreFile(np.concatenate(values), np.concatenate(same).astype(bool))
    if ids is not None:
        joined.ids = (np.concatenate(ids[0]), np.concatenate(ids[1]))
    return joined


def read_score_file(path: Path, fmt: str, impostor: Path | None = None) -> ScoreFile:
    """The scores of `path` in format `fmt` (`FORMATS`)."""
    path = Path(path)
    if fmt in WHITESPACE:
        return read_whitespace(path, fmt)
    if fmt == "pyeer":
        return read_pyeer(path, None if impostor is None else Path(impostor))
    if fmt in ("csv", "bobcsv"):
        return read_csv(path, fmt)
    raise PipelineError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")


# ---------------------------------------------------------------------------------------------------- out


def write_scores(path: Path, fmt: str, values: np.ndarray, same: np.ndarray, a, b, probe) -> None:
    """The scores at full precision (`repr` of each float: reading them back loses nothing): bob4 lines
    `claimed_id real_id test_label score` (`a`, `b` the identities, `probe` the test labels), or a csv with
    `a,b,same,score`. Identities hold no whitespace or commas (replaced by `_`)."""
    a, b = [_token(x) for x in a], [_token(x) for x in b]
    with open(path, "w", newline="") as f:
        if fmt == "csv":
            f.write("a,b,same,score\n")
            f.writelines(f"{x},{y},{int(s)},{v!r}\n" for x, y, s, v in zip(a, b, same, values.tolist(), strict=True))
        else:
            f.writelines(
                f"{x} {y} {_token(t)} {v!r}\n" for x, y, t, v in zip(a, b, probe, values.tolist(), strict=True)
            )


def _token(name) -> str:
    return "_".join(str(name).replace(",", "_").split()) or "_"
