"""ONNX networks (`embed --model FILE.onnx`), run by onnxruntime, and the export of a PyTorch network to ONNX
(`bench onnx-parity`, the tests).

An ONNX file is data: onnxruntime parses its protobuf graph and runs its own kernels, so loading one runs no
Python code (unlike a pickle). The network's first input is the normalised image batch [B, 3, S, S]; its first
output, flattened to [B, D], is the embedding. A fixed S is the input size `embed` crops to; a fixed B is served
in chunks of B (the last one padded). onnxruntime and onnx are the optional extra `onnx` of pyproject.toml."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SUFFIX = ".onnx"
OPSET = 17
"""The opset of `export_onnx` (onnxruntime 1.17 and later run it)."""
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
"""The input types an ONNX network may take: the float32 batch is cast to float16 for the second."""


def is_onnx(name: str) -> bool:
    """`--model` names an ONNX file (by its `.onnx` suffix)."""
    return str(name).lower().endswith(SUFFIX)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise PipelineError(
            "--model FILE.onnx needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu), or install this "
            "project with its extra: pip install -e '.[onnx]'"
        ) from None
    return onnxruntime


def _one_line(e: Exception) -> str:
    """onnxruntime's multi-line messages as one line."""
    return re.sub(r"\s+", " ", str(e)).strip()


def providers(device: torch.device, available: list[str]) -> list[str]:
    """onnxruntime's execution providers for `device`: CUDA (and the CPU for what it leaves) on a GPU when
    onnxruntime-gpu is installed, else the CPU."""
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        log.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu): the ONNX network runs on the CPU")
    return ["CPUExecutionProvider"]


def open_session(path: Path | str, device: torch.device | None = None, deterministic: bool = False):
    """An onnxruntime session of the ONNX file `path`; a missing file or one that is not a valid ONNX model is a
    PipelineError. It runs with torch's thread count (one thread with `deterministic`: rows independent of the
    thread count and of the number of torchrun ranks), threads that sleep rather than spin between batches."""
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"ONNX model {path} does not exist; pass --model with an existing .onnx file")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, reported once by the command
    options.intra_op_num_threads = 1 if deterministic else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = deterministic
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = providers(device or torch.device("cpu"), ort.get_available_providers())
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime's InvalidProtobuf, InvalidGraph, Fail, NotImplemented, ...
        raise PipelineError(
            f"{path} is not an ONNX model onnxruntime can run ({type(e).__name__}: {_one_line(e)[:300]}); pass "
            f"an ONNX file exported from your network (torch.onnx.export)"
        ) from None


def _dim(d) -> int | None:
    """A fixed dimension as an int; a named or unknown one as None."""
    return d if isinstance(d, int) and d > 0 else None


@dataclass(frozen=True)
class OnnxInput:
    """The image input of an ONNX network: its name, element type, fixed batch size and side (None: any)."""

    name: str
    dtype: type
    batch: int | None
    side: int | None

    @classmethod
    def of(cls, session, source: str) -> OnnxInput:
        """The session's one image input; an ONNX network that does not take one float batch [B, 3, S, S] of
        square images is a PipelineError."""
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise PipelineError(
                f"ONNX model {source} takes {len(inputs)} inputs {names}: embed feeds it one image batch"
            )
        x = inputs[0]
        shape = list(x.shape) if x.shape is not None else []
        if len(shape) != 4 or _dim(shape[1]) not in (3, None) or x.type not in DTYPES:
            raise PipelineError(
                f"ONNX model {source} takes {x.type} {shape}: embed feeds a float batch [batch, 3, side, side]"
            )
        height, width = _dim(shape[2]), _dim(shape[3])
        if height != width and height is not None and width is not None:
            raise PipelineError(f"ONNX model {source} takes {height} x {width} images: embed feeds square crops")
        return cls(x.name, DTYPES[x.type], _dim(shape[0]), height if height is not None else width)


def fixed_input_size(path: Path | str) -> int | None:
    """The side of the images the ONNX network at `path` takes when its graph fixes it, else None."""
    session = open_session(path)
    return OnnxInput.of(session, str(path)).side


class OnnxNetwork(nn.Module):
    """An ONNX network in place of a torch one: a normalised float batch (any device) -> its first output as
    float32 [B, D] on the batch's device. It has no parameters; `to()` moves nothing (the session's providers
    are chosen when it is opened)."""

    def __init__(self, session, source: str):
        super().__init__()
        self.session, self.source = session, source
        self.input = OnnxInput.of(session, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().float().cpu().contiguous().numpy().astype(self.input.dtype, copy=False)
        step = self.input.batch or max(len(batch), 1)
        rows = [self._run(batch[i : i + step], step) for i in range(0, len(batch), step)]
        out = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        return torch.from_numpy(out).to(x.device)

    def _run(self, chunk: np.ndarray, step: int) -> np.ndarray:
        """One run of the session on up to `step` images (padded with blank ones to a fixed batch size)."""
        n = len(chunk)
        if self.input.batch is not None and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        try:
            out = self.session.run(None, {self.input.name: chunk})[0]
        except Exception as e:  # onnxruntime's errors: wrong input size, a failing node
            raise RuntimeError(f"onnxruntime: {_one_line(e)[:400]}") from None
        out = np.asarray(out)
        if out.ndim == 0 or out.shape[0] != len(chunk):
            raise RuntimeError(f"the first output of {self.source} has shape {list(out.shape)}, not [batch, ...]")
        return out[:n].reshape(n, -1).astype(np.float32, copy=False)


def load_onnx(path: Path | str, device: torch.device, deterministic: bool = False) -> OnnxNetwork:
    """The ONNX network at `path` on `device` (onnxruntime's CUDA provider where installed, else the CPU)."""
    return OnnxNetwork(open_session(path, device, deterministic), str(path))


def check_input_size(network: OnnxNetwork, input_size: int) -> None:
    """A network whose graph fixes the image side takes that side only."""
    side = network.input.side
    if side is not None and side != input_size:
        raise PipelineError(
            f"ONNX model {network.source} takes {side} x {side} images, not {input_size} x {input_size}: pass "
            f"--input-size {side} (or leave it out: embed reads it from the model)"
        )


def export_onnx(network: nn.Module, path: Path | str, input_size: int = 224, dynamic_batch: bool = True) -> Path:
    """Export `network` (in eval mode, on the CPU) to the ONNX file `path` with torch's TorchScript-based
    exporter (`dynamo=False`: it needs no onnxscript): one input `input` [batch, 3, S, S] with S = `input_size`
    fixed in the graph, one output `embedding`; the batch size is free (`dynamic_batch`) or 2."""
    path = Path(path)
    network = network.eval().cpu()
    example = torch.zeros(2, 3, input_size, input_size)
    axes = {"input": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path
