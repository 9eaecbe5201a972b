"""The one exception type for problems a user can fix (bad input, missing files, wrong options)."""


class PipelineError(Exception):
    """A user-facing error: the message says what is wrong and what to do. `cli.py` prints it without
    a stack trace and exits non-zero."""

    hard_exit: bool = False
    """Set when a library (HDF5 after a failed write) holds a file it can no longer close: the command then
    ends at once after its message (`os._exit`), as the library's own clean-up at exit would crash."""
