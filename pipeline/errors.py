"""The one exception type for problems a user can fix (bad input, missing files, wrong options)."""


class PipelineError(Exception):
    """A user-facing error: the message says what is wrong and what to do. `cli.py` prints it without
    a stack trace and exits non-zero."""
