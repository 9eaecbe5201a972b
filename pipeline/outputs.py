"""What a command may write, replace and delete.

Every command that writes checks its `--out` (`check_folder_out` / `check_file_out`, `check_replaceable`)
before anything is created, then holds `output_lock(out)` (one writer per output) until its last write
(`claim` does both), and replaces an existing output only when a `recognise` function says this tool wrote
it (`--overwrite` alone is not enough). Folders are written
beside their target and renamed into place; an old folder is moved aside, the new one moved in, and only
then are the old one's own files removed, file by file (no recursive delete anywhere)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Recognise = Callable[[Path], "str | None"]
"""Returns None when the path is this tool's output of the expected kind, else what is there instead."""


def _real(p: Path | str) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def check_folder_out(
    out: Path | str, *, inputs: Iterable[Path | str] = (), data_root: Path | str | None = None, holds_inputs=True
) -> None:
    """Refuse a folder `--out` that a replace could destroy things in: `/`, the working folder or a folder
    above it, the data root or a folder above it, and (with `holds_inputs`) an input or a folder holding one."""
    target = _real(out)
    if target == Path(target.anchor):
        raise PipelineError(f"--out {out} is the root folder: choose a new folder for the results")
    if Path.cwd().resolve().is_relative_to(target):
        raise PipelineError(
            f"--out {out} is the working folder or a folder above it: choose a new folder for the results"
        )
    if data_root is not None and _real(data_root).is_relative_to(target):
        raise PipelineError(f"--out {out} is the data root or holds it: choose a folder outside the data")
    for inp in inputs:
        src = _real(inp)
        if src.is_relative_to(target) if holds_inputs else src == target:
            raise PipelineError(f"--out {out} holds the input {inp}: choose a folder that holds no input")


def check_file_out(out: Path | str, *, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse a file `--out` that is a folder or one of the command's inputs."""
    if Path(out).is_dir():
        raise PipelineError(f"--out {out} is a folder: pass a file name")
    target = _real(out)
    for inp in inputs:
        if _real(inp) == target:
            raise PipelineError(f"--out {out} is also an input of this command: pass another --out")


def check_replaceable(out: Path | str, overwrite: bool, recognise: Recognise, what: str) -> None:
    """An absent `out` is fine; an existing one needs `overwrite` and must be this tool's `what`."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise PipelineError(f"{out} exists; pass --overwrite to replace it")
    reason = recognise(out)
    if reason is not None:
        raise PipelineError(
            f"refusing to replace {out}: it is not a {what} this tool wrote ({reason}). Move it away or choose "
            f"another --out."
        )


def io_cause(e: BaseException) -> str:
    """The cause of a failed read or write in a few words: h5py's own 'error message', or the OS's."""
    m = re.search(r"error message = '([^']*)'", str(e))
    if m:
        return m.group(1)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


# ---------------------------------------------------------------------------------------------------- locks


def lock_path(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on `out` (the file `.NAME.lock` beside it) for the block; a second writer of
    the same output is refused at once with a message naming the holder.

    POSIX record locks (`lockf`): the kernel drops them when the holder dies (a killed run does not block
    its `--resume`), and forked workers (DataLoader) do not inherit them. The lock file is removed on exit."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise PipelineError(
                    f"{out} is being written by another run ({holder or 'holder unknown'}); wait for it to finish "
                    f"or choose another --out"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this lock file while we waited for it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def claim(out: Path | str, check: Callable[[], None], own_files: Iterable[str] = ()) -> Iterator[None]:
    """`check()` (location, replaceable), then the output's lock, then what killed runs of this output left
    (`recover_leftovers`), then `check()` again: refused before anything is created, and nothing written since
    the first check is replaced unseen."""
    check()
    with output_lock(out):
        recover_leftovers(Path(out), tuple(own_files))
        check()
        yield


def recover_leftovers(out: Path, own_files: tuple[str, ...]) -> None:
    """Under the output's lock (so no other run is writing them): temporaries of killed runs of `out`
    (`.NAME.<pid>.tmp` files; `.NAME.*.tmp` folders, of which only `own_files` are removed) go; a previous
    output moved aside by a replace that was killed (`.NAME.old*`) is put back when `out` is missing, and
    otherwise its own files are removed."""
    name = glob.escape(out.name)
    for p in out.parent.glob(f".{name}.*.tmp"):
        if p.is_file() and not p.is_symlink() and p.name[len(out.name) + 2 : -4].isdigit():
            p.unlink()
        elif p.is_dir() and not p.is_symlink() and own_files:
            remove_own_files(p, own_files)
    for p in sorted(out.parent.glob(f".{name}.old*")):
        if not (p.is_dir() and not p.is_symlink() and own_files):
            continue
        if not os.path.lexists(out):
            log.warning("putting back %s, moved aside by a run that was killed", out)
            os.replace(p, out)
        else:
            remove_own_files(p, own_files)


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 400, 0).decode(errors="replace").strip()
    return ""


# ---------------------------------------------------------------------------------------------------- replace


def replace_folder(tmp: Path, out: Path, recognise: Recognise, own_files: Iterable[str]) -> None:
    """Move the finished folder `tmp` to `out`. An existing `out` is re-checked with `recognise`, moved aside,
    and after the new folder is in place its `own_files` are removed one by one (then the folder, if empty);
    when moving the new folder in fails, the old one is put back."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    reason = recognise(out)
    if reason is not None:
        raise PipelineError(f"refusing to replace {out}: {reason}")
    old = _free_name(out.with_name(f".{out.name}.old"))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    remove_own_files(old, own_files)


def remove_own_files(folder: Path, names: Iterable[str]) -> None:
    """Remove the named files of `folder`, then `folder` when that left it empty (else keep it, and say so)."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    try:
        folder.rmdir()
    except OSError:
        log.warning("kept %s: it holds files this tool did not write", folder)


def _free_name(base: Path) -> Path:
    for k in range(1000):
        p = base.with_name(f"{base.name}{k or ''}")
        if not os.path.lexists(p):
            return p
    raise PipelineError(f"too many leftover folders named {base}*: remove them")


def replace_file(write: Callable[[Path], None], out: Path) -> None:
    """Write `out` through `write(tmp)` into a temporary file beside it, then rename it over `out`; the
    temporary file is removed on any error, and a failed write is a PipelineError naming `out`."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise PipelineError(f"cannot write {out}: {io_cause(e)}; the previous file, if any, is kept") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


__all__ = [
    "check_folder_out",
    "check_file_out",
    "check_replaceable",
    "io_cause",
    "output_lock",
    "claim",
    "recover_leftovers",
    "lock_path",
    "replace_folder",
    "replace_file",
    "remove_own_files",
]
