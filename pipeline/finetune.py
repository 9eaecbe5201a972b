"""The `finetune` stage: turn an ImageNet CNN into a face-verification network.

Two recipes:

- `study`, the study's method, faithful: Siamese pairs of `pairsDevTrain` through one network, the
  normalised Euclidean distance of the outputs against 0 = same / 1 = different with binary cross entropy,
  SGD with momentum, gradient norm clipped; phase 1 trains the classifier on frozen convolutional features
  (computed once and cached: same mathematics, dropout included), phase 2 the whole network.
- `best`, the project's own: identities of `peopleDevTrain` (a tenth of the people held out for
  validation), a large-margin cosine loss on the penultimate features, horizontal flips, cosine learning
  rate, the last block trained on cached early features, the checkpoint of best validation AUC kept.

A checkpoint (model, optimizer, epoch, step, running state, RNG states, config) is written atomically after
every epoch and on SIGINT/SIGTERM; `resume` continues it and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import models as tvm
from tqdm import tqdm

from pipeline import data, models, outputs
from pipeline.embed import default_data_root
from pipeline.errors import PipelineError
from pipeline.losses import BatchPairLoss, CosFaceLoss, StudyLoss
from pipeline.runtime import autocast, resolve_device, seed_everything

log = logging.getLogger(__name__)

RECIPES = ("study", "best")
# The study's values (AlexNet and VGG-16); other models take AlexNet's.
STUDY_PRESETS = {
    "alexnet": dict(batch_size=22, lr=1e-4, momentum=0.9, phase1_epochs=5, phase2_epochs=15),
    "vgg16": dict(batch_size=4, lr=1e-4, momentum=0.9, phase1_epochs=3, phase2_epochs=2),
}
STUDY_DEFAULTS = dict(
    weight_decay=0.0, cache_dtype="float32", flip=False, keep_best=False, layer="output", loss="study"
)
# The project's recipe, chosen by validation AUC on held-out training people (README, "Fine-tuning").
BEST_PRESET = dict(
    batch_size=128,
    lr=0.01,
    momentum=0.9,
    phase1_epochs=10,
    phase2_epochs=0,
    weight_decay=5e-4,
    cache_dtype="float16",
    flip=True,
    keep_best=True,
    layer="penultimate",
    loss="pairs",
)
# Fields that may change between a run and its resumption.
RUNTIME_FIELDS = ("out", "resume", "overwrite", "device", "workers")


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of `finetune` (see `cli.py finetune --help`). `None` takes the recipe's preset."""

    out: Path
    """Checkpoint file (.pt); rewritten atomically after every epoch; `embed --weights OUT` reads it."""
    data_root: Path = field(default_factory=default_data_root)
    """Folder with LFW (`lfw-py/` or the image folder and protocol files directly)."""
    image_set: str = "deepfunneled"
    """original | funneled | deepfunneled."""
    model: str = "squeezenet1_0"
    """A backbone of `pipeline.models.BACKBONES`."""
    weights: str = "imagenet"
    """Starting weights: imagenet | none | PATH (state_dict or checkpoint)."""
    recipe: str = "study"
    """study (the study's method) | best (the project's recipe)."""
    phase1_epochs: int | None = None
    """Epochs with the frozen part frozen (study: classifier only; best: the last block)."""
    phase2_epochs: int | None = None
    """Epochs training the whole network."""
    batch_size: int | None = None
    """Pairs (study) or images (best) per step."""
    lr: float | None = None
    """Learning rate (best: peak of the cosine schedule)."""
    momentum: float | None = None
    """SGD momentum."""
    weight_decay: float | None = None
    """SGD weight decay (study: 0)."""
    max_pairs: int | None = None
    """Quick runs: study trains on the first N/2 same and the first N/2 different pairs of pairsDevTrain
    (the file lists all same pairs first); best on the first N training images."""
    seed: int = 0
    """Seed of initialisation, shuffling, dropout, flips and the validation split."""
    device: str = "auto"
    """auto | cpu | cuda (mixed precision on CUDA)."""
    workers: int = 2
    """Image-decoding worker processes."""
    resume: bool = False
    """Continue the checkpoint at OUT (same configuration)."""
    overwrite: bool = False
    """Start over although OUT exists."""
    eps: float = 0.01
    """Study: added to the distance and to the running maximum."""
    clip_norm: float = 100.0
    """Gradient norm clip."""
    cache_features: bool = True
    """Phase 1 on features of the frozen part computed once (False: recompute them every step)."""
    cache_dtype: str | None = None
    """float32 | float16 storage of cached features (study: float32, exact; best: float16)."""
    flip: bool | None = None
    """Horizontal-flip augmentation (best; flipped features are cached too)."""
    keep_best: bool | None = None
    """Finish with the weights of the epoch of best validation AUC (best) instead of the last (study)."""
    layer: str | None = None
    """The layer the recipe trains and validates: output (study, Euclidean) | penultimate (best, cosine)."""
    val_fraction: float = 0.1
    """Best: fraction of the peopleDevTrain people held out for validation."""
    val_images: int = 600
    """At most this many validation images (all pairs among them are scored)."""
    loss: str | None = None
    """Best: pairs (every pair of P identities x K images, logistic on the cosine) | cosface (identities)."""
    images_per_person: int = 4
    """Best with loss pairs: K images of each identity in a batch (batch_size / K identities)."""
    margin: float = 0.2
    """Best: CosFace margin."""
    scale: float = 20.0
    """Best: scale of the cosine logits (CosFace or pairs)."""

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.model not in models.BACKBONES:
            raise ValueError(f"model must be one of {sorted(models.BACKBONES)}, got {self.model!r}")
        if self.image_set not in data.IMAGE_DIRS:
            raise ValueError(f"image_set must be one of {sorted(data.IMAGE_DIRS)}, got {self.image_set!r}")
        for name in ("phase1_epochs", "phase2_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError("batch_size must be >= 2")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be > 0")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ValueError("max_pairs must be >= 2")
        if self.cache_dtype not in (None, "float32", "float16"):
            raise ValueError(f"cache_dtype must be float32 or float16, got {self.cache_dtype!r}")
        if self.layer not in (None, *models.LAYERS):
            raise ValueError(f"layer must be one of {models.LAYERS}")
        if not 0 <= self.val_fraction < 1 or self.val_images < 0:
            raise ValueError("val_fraction must be in [0, 1) and val_images >= 0")
        if self.eps <= 0 or self.clip_norm <= 0:
            raise ValueError("eps and clip_norm must be > 0")
        if self.loss not in (None, "study", "pairs", "cosface"):
            raise ValueError(f"loss must be pairs or cosface, got {self.loss!r}")
        if self.images_per_person < 2:
            raise ValueError("images_per_person must be >= 2")
        if self.resume and self.overwrite:
            raise ValueError("pass --resume or --overwrite, not both")

    def resolved(self) -> FinetuneConfig:
        """The configuration with every `None` replaced by the recipe's preset for this model."""
        if self.recipe == "study":
            preset = {**STUDY_PRESETS.get(self.model, STUDY_PRESETS["alexnet"]), **STUDY_DEFAULTS}
        else:
            preset = BEST_PRESET
        return replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    def identity(self) -> dict:
        """What defines the training (JSON-safe): all fields but the run-time ones."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


class TrainingInterrupted(PipelineError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume` continues."""


# --------------------------------------------------------------------------- model parts


def split_model(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """(frozen, tail) with tail(frozen(x)) = model(x) for `output` (frozen = the convolutional features,
    tail = the classifier) or = penultimate(model, x) for `penultimate` (frozen = all but the last block)."""
    flat = nn.Flatten(1)
    if isinstance(model, (tvm.AlexNet, tvm.VGG)):
        frozen = nn.Sequential(model.features, model.avgpool, flat)
        return frozen, (model.classifier if layer == "output" else model.classifier[:-1])
    if isinstance(model, tvm.SqueezeNet):
        if layer == "output":
            return model.features, nn.Sequential(model.classifier, flat)
        # the last two Fire modules train (27 x 27 and 13 x 13): one block alone adapted too little
        return model.features[:10], nn.Sequential(*model.features[10:], nn.AdaptiveAvgPool2d(1), flat)
    if isinstance(model, tvm.ResNet):
        m = model
        stem = [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3]
        if layer == "output":
            return nn.Sequential(*stem, m.layer4, m.avgpool, flat), m.fc
        return nn.Sequential(*stem), nn.Sequential(m.layer4, m.avgpool, flat)
    raise PipelineError(f"no frozen/trainable split known for {type(model).__name__}")


def set_phase(model: nn.Module, frozen: nn.Module, phase: int) -> None:
    """Phase 1: the frozen part in eval mode without gradients; phase 2: everything trains."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if phase == 1:
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)


# --------------------------------------------------------------------------- images


class ImageBank:
    """Decoded images (resize 256, centre crop 224) kept as uint8 in memory; normalised per batch."""

    def __init__(self, proto: data.LFWProtocol, workers: int):
        files = data.ImageFiles([proto.absolute(i) for i in range(len(proto))], data.imagenet_crop())
        self.images = torch.empty((len(proto), 3, 224, 224), dtype=torch.uint8)
        loader = DataLoader(files, batch_size=64, num_workers=workers)
        for x, idx, errors in tqdm(data.batches(loader), total=len(loader), desc="decode", unit="batch"):
            bad = [e for e in errors if e]
            if bad:
                raise PipelineError(bad[0])
            self.images[idx] = x

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float images `idx`; rows where `flip` is true are mirrored left-right."""
        x = data.normalize(self.images[idx])
        if flip is not None and flip.any():
            x[flip] = x[flip].flip(-1)
        return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def compute_features(module: nn.Module, bank: ImageBank, device, dtype: str, flip: bool, desc: str) -> torch.Tensor:
    """`module` (in eval mode) over every image of the bank, once: [N, ...] (or [N, 2, ...] with flips)."""
    module.eval()
    out = None
    variants = (False, True) if flip else (False,)
    for v, mirrored in enumerate(variants):
        for i in tqdm(
            range(0, len(bank), 64), desc=desc + (" (flipped)" if mirrored else ""), unit="batch", dynamic_ncols=True
        ):
            idx = torch.arange(i, min(i + 64, len(bank)))
            x = bank.batch(idx, torch.full((len(idx),), mirrored) if mirrored else None).to(device)
            with autocast(device):
                y = module(x).to("cpu", getattr(torch, dtype))
            if out is None:
                out = torch.empty((len(bank), len(variants), *y.shape[1:]), dtype=y.dtype)
            out[idx, v] = y
    return out if flip else out[:, 0]


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
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
        outputs.replace_file(write, path)
    except PipelineError as e:
        raise PipelineError(f"{e}: make room (or lift the limit) and rerun with --resume") from None


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
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if changed:
        raise PipelineError(
            f"checkpoint {path} was made with another configuration ({'; '.join(changed)}); resume with the same "
            f"options, or pass --overwrite to start over"
        )
    return ckpt


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


# --------------------------------------------------------------------------- data selection


def study_pairs(proto: data.LFWProtocol, max_pairs: int | None) -> data.LFWProtocol:
    """All pairs, or the first ceil(N/2) same and first floor(N/2) different pairs."""
    if max_pairs is None or max_pairs >= len(proto.pairs):
        return proto
    same = np.flatnonzero(proto.pair_labels == 1)[: max_pairs - max_pairs // 2]
    diff = np.flatnonzero(proto.pair_labels == 0)[: max_pairs // 2]
    return proto.select_pairs(np.concatenate([same, diff]))


def validation_rows(labels: np.ndarray, people: np.ndarray, cap: int) -> np.ndarray:
    """Image rows of `people`, those with two or more images first, at most `cap`, in file order."""
    counts = np.bincount(labels, minlength=labels.max() + 1 if len(labels) else 0)
    chosen = np.isin(labels, people)
    multi = np.flatnonzero(chosen & (counts[labels] >= 2))
    single = np.flatnonzero(chosen & (counts[labels] < 2))
    return np.sort(np.concatenate([multi, single])[:cap])


def all_pairs_auc(emb: torch.Tensor, labels: np.ndarray, metric: str) -> float | None:
    """AUC over every pair i < j (similarity: cosine, or minus the Euclidean distance)."""
    if len(labels) < 2:
        return None
    emb = emb.float()
    if metric == "cosine":
        e = F.normalize(emb, dim=1)
        sim = e @ e.T
    else:
        sim = -torch.cdist(emb, emb)
    i, j = np.triu_indices(len(labels), 1)
    same = labels[i] == labels[j]
    if same.all() or not same.any():
        return None
    return float(roc_auc_score(same, sim.numpy()[i, j]))


# --------------------------------------------------------------------------- training


class Trainer:
    """The epoch loop, checkpoints, signals, NaN guard and validation log shared by both recipes."""

    unit = "pair"

    def __init__(self, cfg: FinetuneConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.out = Path(cfg.out)
        self.log_path, self.best_path = side_files(self.out)
        # channels_last: two to three times faster convolutions on CPU (and on GPU with mixed precision)
        self.model = models.build_model(cfg.model, cfg.weights).to(device, memory_format=torch.channels_last)
        self.frozen, self.tail = split_model(self.model, cfg.layer)
        self.metric = "l2" if cfg.layer == "output" else "cosine"
        self.epoch = self.batch_in_epoch = self.step = 0
        self.history: list[dict] = []
        self.best_auc = -math.inf
        self.flag = {"stop": False}
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        self.cache: torch.Tensor | None = None

    # ---- recipe hooks
    def n_items(self) -> int:
        raise NotImplementedError

    def loss_of(self, idx: torch.Tensor, phase: int) -> torch.Tensor:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def lr_at(self, step: int) -> float:
        return self.cfg.lr

    # ---- shared machinery
    @property
    def total_epochs(self) -> int:
        return self.cfg.phase1_epochs + self.cfg.phase2_epochs

    def phase(self, epoch: int) -> int:
        return 1 if epoch < self.cfg.phase1_epochs else 2

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_items(), generator=g)
        return list(perm.split(self.cfg.batch_size))

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_items() / self.cfg.batch_size)

    def checkpoint(self, complete: bool = False) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "rng": rng_state(),
            "history": self.history,
            "best_auc": self.best_auc,
            "complete": complete,
            "config": self.cfg.identity(),
            **self.extra_state(),
        }

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch, self.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        self.history, self.best_auc = list(ckpt["history"]), ckpt["best_auc"]
        self.load_extra_state(ckpt)
        set_rng_state(ckpt["rng"])
        log.info(
            "resuming %s at epoch %d, batch %d (step %d)", self.out, self.epoch + 1, self.batch_in_epoch, self.step
        )

    def save(self) -> None:
        save_atomic(self.checkpoint(), self.out)

    def prepare_phase(self, phase: int) -> None:
        set_phase(self.model, self.frozen, phase)

    def fit(self, ckpt: dict | None) -> Path:
        if ckpt is not None:
            self.restore(ckpt)
        with stop_on_signals(self.flag):
            if self.epoch < self.total_epochs:
                self.prepare_phase(self.phase(self.epoch))
            if ckpt is None:
                self.log_epoch({"epoch": 0, "phase": 0, "val_auc": self.validate()})
            self.save()
            while self.epoch < self.total_epochs:
                phase = self.phase(self.epoch)
                self.prepare_phase(phase)
                t0, loss = time.perf_counter(), self.train_epoch(phase)
                seconds = time.perf_counter() - t0
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                auc = self.validate()
                self.log_epoch(
                    {
                        "epoch": self.epoch,
                        "phase": phase,
                        "loss": loss,
                        "val_auc": auc,
                        "seconds": round(seconds, 2),
                        f"{self.unit}s_per_s": round(self.n_items() / max(seconds, 1e-9), 1),
                        "lr": self.lr_at(self.step - 1),
                    }
                )
                if self.cfg.keep_best and auc is not None and auc > self.best_auc:
                    self.best_auc = auc
                    save_atomic(
                        {
                            "model": self.model.state_dict(),
                            "config": self.cfg.identity(),
                            "epoch": self.epoch,
                            "val_auc": auc,
                        },
                        self.best_path,
                    )
                self.save()
                self.check_stop()
        return self.finish()

    def check_stop(self) -> None:
        if self.flag["stop"]:
            raise TrainingInterrupted(
                f"interrupted: checkpoint {self.out} saved at epoch {self.epoch + 1}, batch {self.batch_in_epoch}; "
                f"rerun the same command with --resume to continue"
            )

    def train_epoch(self, phase: int) -> float:
        batches = self.batches(self.epoch)
        total_loss, n = 0.0, 0
        bar = tqdm(
            total=self.n_items(),
            desc=f"epoch {self.epoch + 1}/{self.total_epochs} (phase {phase})",
            unit=self.unit,
            dynamic_ncols=True,
        )
        bar.update(sum(len(b) for b in batches[: self.batch_in_epoch]))
        with bar:
            for idx in batches[self.batch_in_epoch :]:
                loss = self.train_step(idx, phase)
                total_loss, n = total_loss + loss * len(idx), n + len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total_loss / n:.4f}")
                if self.flag["stop"]:
                    self.save()
                    self.check_stop()
        return total_loss / max(n, 1)

    def train_step(self, idx: torch.Tensor, phase: int) -> float:
        """One optimisation step on items `idx`; a non-finite loss stops training (nothing is saved)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with autocast(self.device):
            loss = self.loss_of(idx, phase)
        if not torch.isfinite(loss):
            raise PipelineError(
                f"the loss became {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}; training stopped "
                f"and the last good checkpoint {self.out} is kept. Lower --lr (now {self.cfg.lr}) and rerun."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        return loss.item()

    def log_epoch(self, record: dict) -> None:
        self.history.append(record)
        auc = record.get("val_auc")
        log.info(
            "epoch %d: %s",
            record["epoch"],
            ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"
            ),
        )
        if auc is None and record["epoch"] == 0:
            log.info("no validation images: validation AUC is not measured")
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise PipelineError(f"cannot write the validation log {self.log_path}: {outputs.io_cause(e)}") from None

    def validate(self) -> float | None:
        if len(self.val_rows) < 2:
            return None
        with torch.no_grad():
            emb = self.embed_rows(torch.as_tensor(self.val_rows))
        return all_pairs_auc(emb, self.val_labels, self.metric)

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Network (eval mode) output at the recipe's layer for bank rows; from the cache in phase 1."""
        was = self.model.training
        self.model.eval()
        out = []
        for idx in rows.split(64):
            with autocast(self.device):
                if self.cache is not None:
                    out.append(self.tail(self.cached(idx)).float().cpu())
                else:
                    out.append(self.tail(self.frozen(self.bank.batch(idx).to(self.device))).float().cpu())
        self.model.train(was)
        return torch.cat(out)

    def cached(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Cached frozen features of bank rows `idx` (the flipped variant where `flip`)."""
        if self.cfg.flip:
            x = self.cache[idx, flip.long() if flip is not None else 0]
        else:
            x = self.cache[idx]
        x = x.to(self.device).float()
        # the layout of the uncached path: dropout masks follow the memory layout
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def finish(self) -> Path:
        ckpt = self.checkpoint(complete=True)
        if self.cfg.keep_best and self.best_path.exists():
            best = torch.load(self.best_path, map_location="cpu", weights_only=True)
            ckpt["model"], ckpt["best_epoch"] = best["model"], best["epoch"]
            log.info("keeping epoch %d (validation AUC %.4f)", best["epoch"], best["val_auc"])
        save_atomic(ckpt, self.out)
        log.info("wrote %s", self.out)
        return self.out


class StudyTrainer(Trainer):
    """The study's Siamese recipe on pairsDevTrain."""

    unit = "pair"

    def __init__(self, cfg: FinetuneConfig, device: torch.device):
        super().__init__(cfg, device)
        pairs = study_pairs(data.load_protocol(cfg.data_root, cfg.image_set, "pairs", "train"), cfg.max_pairs)
        people = data.load_protocol(cfg.data_root, cfg.image_set, "people", "train")
        # Validation: training people that appear in no pairsDevTrain pair (the study trains on all pairs).
        all_pairs = data.load_protocol(cfg.data_root, cfg.image_set, "pairs", "train")
        held = np.array(
            [i for i, n in enumerate(people.identities) if n not in set(all_pairs.identities)], dtype=np.int64
        )
        val = people.subset(validation_rows(people.labels, held, cfg.val_images))
        self.n_train_images = len(pairs)
        merged = data.LFWProtocol(
            pairs.data_root,
            cfg.image_set,
            "pairs",
            "train",
            pairs.paths + val.paths,
            np.concatenate([pairs.labels, val.labels]),
            [],
        )
        self.bank = ImageBank(merged, cfg.workers)
        self.pairs = torch.as_tensor(pairs.pairs)
        self.different = torch.as_tensor(1 - pairs.pair_labels.astype(np.int64))
        self.val_rows = np.arange(len(pairs), len(merged))
        self.val_labels = val.labels
        self.loss = StudyLoss(cfg.eps).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        log.info(
            "study recipe: %d pairs (%d same), %d images, %d validation images of held-out people",
            len(self.pairs),
            int(pairs.pair_labels.sum()),
            len(pairs),
            len(self.val_rows),
        )

    def n_items(self) -> int:
        return len(self.pairs)

    def extra_state(self) -> dict:
        return {"running_max": self.loss.running_max.item(), "loss": self.loss.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])

    def prepare_phase(self, phase: int) -> None:
        super().prepare_phase(phase)
        if phase == 1 and self.cfg.cache_features and self.cache is None:
            t0 = time.perf_counter()
            self.cache = compute_features(
                self.frozen, self.bank, self.device, self.cfg.cache_dtype, False, "cache features"
            )
            log.info("cached frozen features of %d images in %.1f s", len(self.bank), time.perf_counter() - t0)
            self.frozen.eval()
        if phase == 2:
            self.cache = None

    def loss_of(self, idx: torch.Tensor, phase: int) -> torch.Tensor:
        pairs = self.pairs[idx]
        rows = torch.cat([pairs[:, 0], pairs[:, 1]])
        if phase == 1 and self.cache is not None:
            out = self.tail(self.cached(rows))
        elif phase == 1:
            with torch.no_grad():
                z = self.frozen(self.bank.batch(rows).to(self.device))
            out = self.tail(z)
        else:
            out = self.model(self.bank.batch(rows).to(self.device))
        a, b = out.float().chunk(2)
        return self.loss(a, b, self.different[idx].to(self.device))


class BestTrainer(Trainer):
    """The project's recipe: identities of peopleDevTrain, CosFace on the penultimate features, flips,
    cosine learning rate, the last block trained on cached early features."""

    unit = "img"

    def __init__(self, cfg: FinetuneConfig, device: torch.device):
        super().__init__(cfg, device)
        people = data.load_protocol(cfg.data_root, cfg.image_set, "people", "train")
        rng = np.random.default_rng(cfg.seed)
        k = len(people.identities)
        n_val = min(k - 1, max(2, round(cfg.val_fraction * k))) if cfg.val_fraction > 0 else 0
        held = np.sort(rng.permutation(k)[:n_val])
        val_rows = validation_rows(people.labels, held, cfg.val_images)
        train = ~np.isin(people.labels, held)
        if cfg.loss == "pairs":  # pairs need two images of a person
            train &= np.bincount(people.labels)[people.labels] >= 2
        train_rows = np.flatnonzero(train)[: cfg.max_pairs]
        rows = np.concatenate([train_rows, val_rows])
        self.bank = ImageBank(people.subset(rows), cfg.workers)
        classes, labels = np.unique(people.labels[train_rows], return_inverse=True)
        self.train_labels = torch.as_tensor(labels, dtype=torch.int64)
        self.groups = [
            g for g in torch.as_tensor(labels).argsort(stable=True).split(np.bincount(labels).tolist()) if len(g) >= 2
        ]
        self.n_train = len(train_rows)
        self.val_rows = np.arange(len(train_rows), len(rows))
        self.val_labels = people.labels[val_rows]
        b = models.backbone(cfg.model)
        dim = b.penultimate_dim if cfg.layer == "penultimate" else b.output_dim
        if cfg.loss == "cosface":
            self.head = CosFaceLoss(dim, len(classes), cfg.scale, cfg.margin).to(device)
        else:
            self.head = BatchPairLoss(cfg.scale).to(device)
        params = [{"params": list(self.model.parameters())}, {"params": list(self.head.parameters())}]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        log.info(
            "best recipe (%s loss): %d training images of %d people, %d validation images of %d held-out people",
            cfg.loss,
            self.n_train,
            len(classes),
            len(self.val_rows),
            n_val,
        )

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """cosface: a shuffle of the images; pairs: P identities x K images (a random K of each)."""
        if self.cfg.loss == "cosface":
            return super().batches(epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        k = self.cfg.images_per_person
        picks = [
            self.groups[i][torch.randperm(len(self.groups[i]), generator=g)[:k]]
            for i in torch.randperm(len(self.groups), generator=g)
        ]
        per_batch = max(2, self.cfg.batch_size // k)
        out = [picks[i : i + per_batch] for i in range(0, len(picks), per_batch)]
        if len(out) > 1 and len(out[-1]) < 2:  # a batch needs two identities
            out[-2] += out.pop()
        return [torch.cat(b) for b in out]

    def steps_per_epoch(self) -> int:
        if not hasattr(self, "_steps"):
            self._steps = len(self.batches(0))
        return self._steps

    def n_items(self) -> int:
        if self.cfg.loss == "cosface":
            return self.n_train
        return sum(min(len(g), self.cfg.images_per_person) for g in self.groups)

    def lr_at(self, step: int) -> float:
        total = self.total_epochs * self.steps_per_epoch()
        return 0.5 * self.cfg.lr * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))

    def extra_state(self) -> dict:
        return {"head": self.head.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])

    def prepare_phase(self, phase: int) -> None:
        super().prepare_phase(phase)
        self.head.train()
        if phase == 1 and self.cfg.cache_features and self.cache is None:
            t0 = time.perf_counter()
            self.cache = compute_features(
                self.frozen, self.bank, self.device, self.cfg.cache_dtype, self.cfg.flip, "cache features"
            )
            log.info("cached frozen features of %d images in %.1f s", len(self.bank), time.perf_counter() - t0)
            self.frozen.eval()
        if phase == 2:
            self.cache = None

    def loss_of(self, idx: torch.Tensor, phase: int) -> torch.Tensor:
        flip = torch.randint(0, 2, (len(idx),), dtype=torch.bool) if self.cfg.flip else None
        if phase == 1 and self.cache is not None:
            emb = self.tail(self.cached(idx, flip))
        elif phase == 1:
            with torch.no_grad():
                z = self.frozen(self.bank.batch(idx, flip).to(self.device))
            emb = self.tail(z)
        else:
            emb = self.tail(self.frozen(self.bank.batch(idx, flip).to(self.device)))
        return self.head(emb, self.train_labels[idx].to(self.device))


def side_files(out: Path) -> tuple[Path, Path]:
    """(validation log, best-epoch checkpoint) written beside the checkpoint `out`."""
    return out.with_suffix(".log"), out.with_name(out.stem + ".best.pt")


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


def check_outputs(cfg: FinetuneConfig) -> None:
    """Refuse what would replace or delete a file this command did not write: the checkpoint is replaced only
    with --overwrite (and when it is ours); its log and best-epoch file only when the checkpoint is replaced
    or, with --resume, when a killed run left them without a checkpoint."""
    out = Path(cfg.out)
    weights = [Path(cfg.weights)] if cfg.weights not in ("imagenet", "none") else []
    outputs.check_file_out(out, inputs=weights)
    if out in side_files(out):
        raise PipelineError(f"--out {out} would be its own log or best-epoch file: pass a name ending in .pt")
    if cfg.resume and out.exists():
        return  # load_checkpoint checks it; the log and best file go on
    if out.exists():
        outputs.check_replaceable(out, cfg.overwrite, recognise_checkpoint, "finetune checkpoint")
    fresh_ok = cfg.overwrite or cfg.resume  # starting over on purpose, or after a run killed before its checkpoint
    for path, recognise in zip(side_files(out), (recognise_log, recognise_checkpoint), strict=True):
        if os.path.lexists(path) and not fresh_ok:
            raise PipelineError(
                f"{path} exists beside --out {out} (finetune writes its validation log and best epoch there): "
                f"move it away, or pass --overwrite to start over if an earlier finetune run wrote it"
            )
        if os.path.lexists(path):
            outputs.check_replaceable(path, True, recognise, "file of an earlier finetune run")


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune `cfg.model` with `cfg.recipe`; returns the final checkpoint (OUT)."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    with outputs.claim(out, lambda: check_outputs(cfg)):
        return _finetune(cfg, out)


def _finetune(cfg: FinetuneConfig, out: Path) -> Path:
    ckpt = None
    if out.exists() and cfg.resume:
        ckpt = load_checkpoint(out, cfg)
        if ckpt.get("complete"):
            log.info("%s is already complete; nothing to do", out)
            return out
    elif cfg.resume:
        log.warning("no checkpoint at %s: starting from the beginning", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is None:  # check_outputs recognised these as an earlier run's of this output
        for path in side_files(out):
            path.unlink(missing_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    trainer = (StudyTrainer if cfg.recipe == "study" else BestTrainer)(cfg, device)
    log.info("config: %s", json.dumps(cfg.identity()))
    return trainer.fit(ckpt)
