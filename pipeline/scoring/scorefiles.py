"""Score files in and out: another system's scores (bob's 4- and 5-column files and its CSV, pyeer's genuine and
impostor lists, a plain CSV; `.gz` too), read in blocks without torch, and the scores of listed pairs written at
full precision. A malformed line is a PipelineError naming the file and the line, never a skipped row.

Whitespace-separated files are parsed block by block (whole lines) by NumPy's C `loadtxt`, which also refuses a
line with another number of fields; CSVs by the csv module. Identities become byte-string arrays: compared for
same-person flags, hashed into the jackknife's groups (`identity_group`)."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

FORMATS = ("bob4", "bob5", "bobcsv", "pyeer", "csv")
EXPORTS = ("bob4", "csv")
WORKERS = 4  # processes parsing blocks at most
BLOCK_BYTES = 2 << 20  # bytes read at a time (whole lines): loadtxt holds several times a block while parsing it
WHITESPACE = {"bob4": (4, 0, 1, 3), "bob5": (5, 0, 2, 4)}
"""format -> (fields per line, claimed identity, real identity, score): same person when the two match."""


@dataclass
class ScoreBlock:
    """Scores read from a block of lines: float64 values (higher: more alike), same-person flags, and with the
    format's identities the jackknife's group pair of each score (`group_pair`, uint8, see `identity_group`)."""

    values: np.ndarray
    same: np.ndarray
    group_pair: np.ndarray | None = None


@dataclass
class ScoreFile:
    """A whole file's scores (`ScoreBlock`s joined)."""

    values: np.ndarray
    same: np.ndarray
    group_pair: np.ndarray | None = None


def identity_group(names: np.ndarray, groups: int) -> np.ndarray:
    """Each identity's group (0..groups-1) from a hash of its name (bytes, `S` array): the same name is in the same
    group in every block and file, without a table of the names seen."""
    width = -(-max(1, names.dtype.itemsize) // 8) * 8
    words = np.ascontiguousarray(names.astype(f"S{width}")).view(np.uint64).reshape(len(names), width // 8)
    h = np.zeros(len(names), dtype=np.uint64)
    for k in range(words.shape[1]):  # a multiply-xorshift hash of each 8-byte word of the zero-padded name
        h = (h ^ words[:, k]) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return (h % np.uint64(groups)).astype(np.uint8)


def _group_pair(a: np.ndarray, b: np.ndarray, groups: int | None) -> np.ndarray | None:
    if not groups:
        return None
    return identity_group(a, groups) * np.uint8(groups) + identity_group(b, groups)


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


def _fields(line: bytes, sep: bytes | None) -> list[bytes]:
    """A line's fields: split at whitespace, or by the csv module at `sep` (quotes as CSV has them)."""
    if sep is None:
        return line.split()
    return [f.encode() for f in next(csv.reader([line.decode(errors="replace")], delimiter=sep.decode()), [])]


def _lines(block: bytes, first: int, sep: bytes | None, skip: int) -> Iterator[tuple[int, bytes, list[bytes]]]:
    """(line number, line, fields) of the block's lines that hold data: no blank line, no `#` comment
    (whitespace-separated files), none of the first `skip`."""
    for k, ln in enumerate(block.split(b"\n")[skip:], skip):
        fields = _fields(ln, sep)
        if fields and not (sep is None and fields[0].startswith(b"#")):
            yield first + k, ln, fields


def _bad_line(path: Path, first: int, block: bytes, ncols: int, score_at: int, sep: bytes | None = None,
              skip: int = 0) -> PipelineError:  # fmt: skip
    """The error naming the first line of `block` (numbered from `first`) with another number of fields than
    `ncols` or no finite number in field `score_at`."""
    for number, ln, fields in _lines(block, first, sep, skip):
        if len(fields) != ncols or not _is_finite(fields[score_at]):
            shown = ln.strip()[:120].decode(errors="replace")
            return PipelineError(f"{path} line {number}: expected {ncols} fields with a finite score, got {shown!r}")
    return PipelineError(f"{path}: a line from line {first} on is malformed")


def _is_finite(s: bytes) -> bool:
    try:
        return bool(np.isfinite(float(s)))
    except ValueError:
        return False


def parse_rows(path: Path, first: int, raw: bytes, ncols: int, score_at: int, sep: bytes | None = None,
               skip: int = 0) -> np.ndarray:  # fmt: skip
    """The rows of a block of whole lines (numbered from `first`) with `ncols` fields, whitespace-separated (`#`
    comments skipped) or CSV (`sep`, quotes as CSV has them), as a structured array: fields `f<k>`, float64 for
    the score (`score_at`), byte strings as long as the block's longest line for the others; blank lines and the
    first `skip` lines skipped. NumPy's C `loadtxt` parses the block and refuses a line with another number of
    fields."""
    b = np.frombuffer(raw, dtype=np.uint8)
    width = int(np.diff(np.r_[-1, np.flatnonzero(b == 10)]).max())  # no field is longer than a line
    width = -(-width // 8) * 8  # whole 8-byte words (`identity_group`)
    at = score_at % ncols
    dtype = [(f"f{k}", "f8" if k == at else f"S{width}") for k in range(ncols)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a block of comments only: no rows
            rows = np.loadtxt(io.BytesIO(raw), dtype=dtype, ndmin=1, skiprows=skip, delimiter=sep and sep.decode(),
                              comments=None if sep else "#", quotechar='"' if sep else None)  # fmt: skip
    except ValueError:
        raise _bad_line(path, first, raw, ncols, at, sep, skip) from None
    if not np.isfinite(rows[f"f{at}"]).all():
        raise _bad_line(path, first, raw, ncols, at, sep, skip)
    return rows


def _first_fields(raw: bytes) -> int:
    """The number of fields of the block's first line that is no comment or blank (0: none)."""
    return len(next((ln.split() for ln in raw.split(b"\n") if ln.split() and not ln.lstrip().startswith(b"#")), []))


def bob_block(job: tuple[Path, int, bytes, str, int | None]) -> ScoreBlock:
    """bob4 (`claimed_id real_id test_label score`) or bob5 (`claimed_id model_label real_id test_label score`)
    lines: same person when claimed_id equals real_id."""
    path, first, raw, fmt, groups = job
    ncols, claimed, real, at = WHITESPACE[fmt]
    rows = parse_rows(path, first, raw, ncols, at)
    a, b = rows[f"f{claimed}"], rows[f"f{real}"]
    # a copy: the score field is a view that would keep the whole block's rows alive
    return ScoreBlock(rows[f"f{at}"].copy(), a == b, _group_pair(a, b, groups))


def list_block(job: tuple[Path, int, bytes, int, bool]) -> ScoreBlock:
    """pyeer lines of `ncols` fields, the score in the last."""
    path, first, raw, ncols, same = job
    v = parse_rows(path, first, raw, ncols, -1)[f"f{ncols - 1}"].copy()
    return ScoreBlock(v, np.full(len(v), same))


def ordered_map(func: Callable, jobs: Iterator, workers: int | None = None) -> Iterator:
    """`map(func, jobs)`, in `workers` processes (default: the CPUs, up to `WORKERS`) once there are two jobs or
    more: the blocks of a file parsed side by side, in order, a few ahead of the reader."""
    workers = workers or min(WORKERS, os.cpu_count() or 1)
    jobs = iter(jobs)
    head = list(itertools.islice(jobs, 2))
    if workers < 2 or len(head) < 2:
        yield from map(func, itertools.chain(head, jobs))
        return
    # fork where there is one: a worker needs only this module's functions, and spawn would import __main__ again
    # (impossible for a script read from standard input)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque = deque()
        for job in itertools.chain(head, jobs):
            pending.append(pool.submit(func, job))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def whitespace_blocks(path: Path, fmt: str, groups: int | None) -> Iterator[ScoreBlock]:
    """bob4 or bob5 (`bob_block`), block by block."""
    for blk in ordered_map(bob_block, ((path, first, raw, fmt, groups) for first, raw in blocks(path))):
        if len(blk.values):
            yield blk


def pyeer_blocks(genuine: Path, impostor: Path | None) -> Iterator[ScoreBlock]:
    """pyeer's lists: every line of `genuine` a same-person score, of `impostor` a different-person one, each in
    the line's last field (as many fields on every line of a file as on its first)."""
    if impostor is None:
        raise PipelineError("--format pyeer reads two files: --scores GENUINE --impostor-scores IMPOSTOR")
    for path, same in ((genuine, True), (impostor, False)):
        ncols = 0

        def jobs(path=path, same=same):
            nonlocal ncols
            for first, raw in blocks(path):
                ncols = ncols or _first_fields(raw)
                if ncols:
                    yield path, first, raw, ncols, same

        for blk in ordered_map(list_block, jobs()):
            if len(blk.values):
                yield blk


def csv_blocks(path: Path, fmt: str, groups: int | None) -> Iterator[ScoreBlock]:
    """csv (a header with `score` and `same`, 1/0 or true/false, optionally `a` and `b`) or bobcsv (a header with
    `bio_ref_subject_id`, `probe_subject_id` and `score`; other columns are metadata), block by block
    (`csv_block`); a quoted field may not run over lines."""
    want = ("a", "b") if fmt == "csv" else ("bio_ref_subject_id", "probe_subject_id")
    header: list[str] = []

    def jobs():
        for first, raw in blocks(path):
            skip = 0
            if not header:
                header.extend(
                    f.decode("utf-8", errors="replace").strip() for f in _fields(raw[: raw.find(b"\n")], b",")
                )
                skip = 1
            if b'"' in raw:
                _check_quotes(path, first, raw)
            yield path, first, raw, _columns(path, header, fmt, want), len(header), skip, groups

    for blk in ordered_map(csv_block, jobs()):
        if len(blk.values):
            yield blk


def _columns(path: Path, header: list[str], fmt: str, want: tuple[str, str]) -> dict[str, int]:
    """Where the wanted columns are: `score`, `same` (csv), the two identities (`a`/`b` optional for csv)."""
    at = {k: header.index(k) for k in ("score", "same", *want) if k in header}
    missing = [k for k in (("score", "same") if fmt == "csv" else (*want, "score")) if k not in at]
    if missing:
        raise PipelineError(f"{path} line 1: the header has no {', '.join(missing)} column (it has {header})")
    at["a"], at["b"] = at.pop(want[0], None), at.pop(want[1], None)
    return at


def _check_quotes(path: Path, first: int, raw: bytes) -> None:
    for k, ln in enumerate(raw.split(b"\n")):
        if ln.count(b'"') % 2:
            raise PipelineError(f"{path} line {first + k}: a quoted field runs over lines; write one score per line")


def csv_block(job: tuple) -> ScoreBlock:
    """The scores of a block of CSV lines; same person from `same` (csv) or the two identities (bobcsv)."""
    path, first, raw, at, ncols, skip, groups = job
    rows = parse_rows(path, first, raw, ncols, at["score"], b",", skip)
    a, b = (None if at[k] is None else rows[f"f{at[k]}"] for k in ("a", "b"))
    if "same" in at:
        same = _flags(rows[f"f{at['same']}"], lambda: _bad_flag(path, first, raw, at["same"], skip))
    else:
        same = a == b
    v = rows[f"f{at['score']}"].copy()
    return ScoreBlock(v, same, None if a is None or b is None else _group_pair(a, b, groups))


def _flags(col: np.ndarray, bad: Callable[[], PipelineError]) -> np.ndarray:
    """1/0 or true/false (any case, spaces around) as booleans."""
    one = col == b"1"
    if (one | (col == b"0")).all():
        return one
    low = np.char.lower(np.char.strip(col))
    one = (low == b"1") | (low == b"true")
    if not (one | (low == b"0") | (low == b"false")).all():
        raise bad()
    return one


def _bad_flag(path: Path, first: int, raw: bytes, same_at: int, skip: int) -> PipelineError:
    for number, _, fields in _lines(raw, first, b",", skip):
        if fields[same_at].strip().lower() not in (b"1", b"0", b"true", b"false"):
            return PipelineError(f"{path} line {number}: same must be 1, 0, true or false, not {fields[same_at]!r}")
    return PipelineError(f"{path}: a same flag from line {first} on is malformed")


def read_blocks(path: Path, fmt: str, impostor: Path | None = None, groups: int | None = None) -> Iterator[ScoreBlock]:
    """The scores of `path` in format `fmt` (`FORMATS`), block by block; with `groups`, each score's group pair
    where the format names identities."""
    path = Path(path)
    if fmt in WHITESPACE:
        return whitespace_blocks(path, fmt, groups)
    if fmt == "pyeer":
        return pyeer_blocks(path, None if impostor is None else Path(impostor))
    if fmt in ("csv", "bobcsv"):
        return csv_blocks(path, fmt, groups)
    raise PipelineError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def read_score_file(path: Path, fmt: str, impostor: Path | None = None, groups: int | None = None) -> ScoreFile:
    """The whole file (`read_blocks` joined); a PipelineError when it holds no scores."""
    parts = list(read_blocks(path, fmt, impostor, groups))
    if not sum(len(p.values) for p in parts):
        raise PipelineError(f"{path} holds no scores")
    joined = [np.concatenate([getattr(p, k) for p in parts]) for k in ("values", "same")]
    pairs = None if parts[0].group_pair is None else np.concatenate([p.group_pair for p in parts])
    return ScoreFile(joined[0], joined[1].astype(bool), pairs)


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
