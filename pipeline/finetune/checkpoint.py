"""Everything about the files a run writes: the checkpoint (atomic, with the RNG states), the validation log,
best-epoch file and training figure beside it, recognising them, and SIGINT/SIGTERM turned into "save and stop"."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.finetune.config import FinetuneConfig
from pipeline.report import figures, training

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """The torch, NumPy, Python and CUDA generator states, in tensors and lists `weights_only` loading reads."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuples(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_atomic(obj: dict, path: Path) -> None:
    """Serialise in memory, write a temporary file beside `path`, fsync, rename over it. A failed write (full
    disk, file size limit) is one PipelineError naming the file; the previous checkpoint stays."""
    buf = io.BytesIO()
    torch.save(obj, buf)  # in memory first: torch's writer hides the OS's cause of a failed write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        outputs.replace_file(write, path)  # looked up at call time: tests and fault runs patch it
    except PipelineError as e:
        raise PipelineError(f"{e}: make room (or lift the limit) and rerun with --resume") from None


LATER_FIELDS = {
    "train_blocks": None,
    "tta_flip": False,
    "lr_decay": 1.0,
    "pool": "avg",
    "bf16": False,
    "feature_shift": 0,
    "singletons": False,
    "ema": 0.0,
    "split_seed": None,
    "members": 1,
    "cohort_top": 0,
    "val_per_person": 0,
    "study_max": "with-batch",
}
"""Configuration fields added after checkpoints were first written, with the value that trains as before."""


def load_checkpoint(path: Path, cfg: FinetuneConfig) -> dict:
    """Read a checkpoint to resume `cfg`; another model or a changed configuration is refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PipelineError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise PipelineError(f"{path} is not a finetune checkpoint; pass another --out or --overwrite")
    saved = ckpt["config"]
    if saved.get("model") != cfg.model:
        raise PipelineError(
            f"checkpoint {path} is for model {saved.get('model')}, not {cfg.model}; pass --model {saved.get('model')} or another --out"
        )
    now = cfg.identity()
    saved = {**LATER_FIELDS, **saved}
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if changed:
        raise PipelineError(
            f"checkpoint {path} was made with another configuration ({'; '.join(changed)}); resume with the same "
            f"options, or pass --overwrite to start over"
        )
    return ckpt


def side_files(out: Path) -> tuple[Path, Path, Path]:
    """(validation log, best-epoch checkpoint, training figure) written beside the checkpoint `out`:
    NAME.log, NAME.best.pt, NAME.training.png."""
    return out.with_suffix(".log"), out.with_name(out.stem + ".best.pt"), training.training_figure_path(out)


def append_log(path: Path, record: dict) -> None:
    """Append one epoch's record to the validation log (JSON lines)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise PipelineError(f"cannot write the validation log {path}: {outputs.io_cause(e)}") from None


def recognise_checkpoint(path: Path) -> str | None:
    """None when `path` is a checkpoint that `finetune` wrote (read without running code); else what it is."""
    if Path(path).is_symlink() or not Path(path).is_file():
        return "it is not a regular file"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return "it is not a checkpoint torch can read safely"
    ours = isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)
    return None if ours else "it is not a finetune checkpoint"


def recognise_log(path: Path) -> str | None:
    """None when `path` is a validation log that `finetune` wrote (JSON lines with an epoch); else what it is."""
    if Path(path).is_symlink() or not Path(path).is_file():
        return "it is not a regular file"
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return "it is not a finetune log"
    return None if all(isinstance(r, dict) and "epoch" in r for r in records) else "it is not a finetune log"


def recognise_training_figure(path: Path) -> str | None:
    """None when `path` is a training figure that this tool drew; else what it is."""
    return figures.recognise_figure(path, "training")


def write_training_figure(path: Path, history: list[dict], config: dict, best_epoch: int | None = None) -> None:
    """Draw the training curves of `history` into `path` (atomically: temporary file, then rename)."""
    title = training.training_title(config)
    outputs.replace_file(lambda p: training.draw_training(history, p, title, best_epoch), Path(path))


@contextlib.contextmanager
def stop_on_signals(flag: dict) -> Iterator[None]:
    """SIGINT/SIGTERM set flag['stop'] (the loop saves and exits after the current batch); a second one
    stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("%s: saving a checkpoint after this batch (again to stop at once)", signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
