"""Reading pickle-based files that anyone may have made (the `.bin` face sets of insightface: a pickled tuple
of JPEG bytes and same/different flags). A restricted unpickler builds plain data (bytes, str, numbers, bools,
lists, tuples, dicts, sets) and NumPy arrays and scalars, and refuses every other global: a crafted file
cannot call anything, so it runs no code. Weights and checkpoints go through `torch.load(weights_only=True)`."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from pipeline.errors import PipelineError

ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in protocol 5 pickles (plain dtypes only)
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    }
)
"""(module, name) pairs an untrusted pickle may name: what NumPy arrays, scalars and bytes are rebuilt from;
none of them runs anything but the rebuilding."""


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `ALLOWED_GLOBALS`; any other global is a PipelineError."""

    def __init__(self, file, source: str, encoding: str = "bytes"):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise PipelineError(
            f"{self.source} asks to load {module}.{name}: refusing (a pickle file can run code; only plain data "
            f"and NumPy arrays are read from it)"
        )


def load_pickle(path: Path | str, encoding: str = "bytes") -> object:
    """Unpickle `path` with `RestrictedUnpickler` (`encoding="bytes"` reads Python 2 pickles as insightface's
    `.bin` files need); a truncated or malformed file is a PipelineError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PipelineError(f"cannot read {path}: {e}") from e
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(path), encoding).load()
    except PipelineError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...: a damaged file
        raise PipelineError(f"{path} is not a readable pickle file (truncated or corrupt?): {e}") from e


__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "load_pickle"]
