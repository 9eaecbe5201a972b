"""The one training loop (`Trainer`): two phases of epochs, atomic checkpoints and resumption, signals,
the NaN guard, validation after every epoch (AUC, TAR at FAR 1e-3) with its log and figure, and the best epoch
kept. Recipes subclass it and answer a few hooks (`pipeline.finetune.hooks`; `pipeline.finetune.study`, `.best`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.finetune.averaging import WeightAverage
from pipeline.finetune.checkpoint import (
    append_log,
    rng_state,
    save_atomic,
    set_rng_state,
    side_files,
    stop_on_signals,
    write_training_figure,
)
from pipeline.finetune.config import FinetuneConfig, TrainingInterrupted
from pipeline.finetune.features import FeatureFile, Handover, ImageBank, cached_rows, random_shift, set_phase
from pipeline.finetune.hooks import RecipeHooks
from pipeline.finetune.split import TrainingSplit
from pipeline.finetune.validation import TAR_KEY, all_pairs_metrics
from pipeline.nets import layers, models
from pipeline.nets.split import split_model
from pipeline.runtime import autocast, log_memory

log = logging.getLogger(__name__)


class Trainer(RecipeHooks):
    """The epoch loop shared by the recipes. A recipe's constructor calls `load_images` and sets `optimizer`
    (`sgd`); its hooks (`RecipeHooks`) say which items an epoch goes over (`n_items`, `batches`), the loss of a
    batch (`loss_of`), the learning rate of a step (`lr_at`) and its own running state (`extra_state`)."""

    unit = "pair"
    """What `n_items` counts (progress bar and the log's throughput)."""
    flips = False
    """Whether `loss_of` draws horizontal flips (the feature cache then holds mirrored images too)."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device, shared: Handover | None = None):
        self.cfg, self.device = cfg, device
        self.shared = shared or Handover()
        """Decoded images and cached features, handed from one member of an ensemble to the next."""
        self.out = Path(cfg.out)
        self.log_path, self.best_path, self.figure_path = side_files(self.out)
        # channels_last: faster convolutions than the default layout on CPU (and on GPU with mixed precision)
        model = models.build_model(cfg.model, cfg.weights)
        if isinstance(model, layers.EmbeddingNetwork):
            raise PipelineError(f"{cfg.weights} is an ensemble (finetune --members): start from one member's file")
        if cfg.pool == "learned" and not hasattr(model, layers.POOL):
            layers.add_learned_pool(model, layers.feature_side(model))
        self.model = model.to(device, memory_format=torch.channels_last)
        self.frozen, self.tail = split_model(self.model, cfg.layer, cfg.train_blocks)
        self.metric = "l2" if cfg.layer == "output" else "cosine"
        self.epoch = self.batch_in_epoch = self.step = 0
        self.epoch_loss: tuple[float, int] = (0.0, 0)
        """(sum of loss x items, items) of the epoch so far: saved, so a resumed epoch reports its whole loss."""
        self.history: list[dict] = []
        self.best_auc = -math.inf
        self.drawn = -1
        """The epoch the training figure was last drawn at."""
        self.flag = {"stop": False}
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        self.cache: torch.Tensor | FeatureFile | None = None
        self.optimizer: torch.optim.Optimizer
        self.bank: ImageBank
        self.val_rows, self.val_labels = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.val_files: list[Path] = []
        """The validation images' files (in `val_rows`' order)."""
        self.val_paths: list[str] = []
        """The same, relative to the data root (the checkpoint's `validation_paths`)."""
        self.average = WeightAverage(cfg.ema or 0.0)

    # ---- what recipes build on
    def load_images(self, split: TrainingSplit) -> None:
        """The training images, then the validation images, of the recipe's `split`: decoded and kept unless the
        feature cache is all the recipe reads (no whole-network phase; mirror images cached where it embeds them)."""
        train, val = split.train, split.validation
        paths, labels = train.paths + val.paths, np.concatenate([train.labels, val.labels])
        proto = lfw.FaceSet(train.data_root, train.image_set, train.protocol, train.split, paths, labels, [])
        cfg = self.cfg
        cache_only = cfg.cache_features and cfg.phase2_epochs == 0 and (self.flips or not cfg.tta_flip)
        self.bank = self.shared.bank(proto, cfg.workers, keep=not cache_only)
        self.val_rows, self.val_labels = np.arange(len(train), len(paths)), val.labels
        self.val_files = [val.absolute(i) for i in range(len(val))]
        self.val_paths = list(val.paths)

    def sgd(self, *heads: nn.Module) -> torch.optim.SGD:
        """SGD over the model's parameters, and over each head's (a group of its own) when it has any. With
        `lr_decay` d, the k-th trained block below the last learns at d^k times the rate (`lr_scale`)."""
        pool = getattr(self.model, layers.POOL, None)  # a learned pooling learns at the full rate
        blocks = [m for m in self.tail.children() if m is not pool and any(True for _ in m.parameters())][::-1]
        decay = self.cfg.lr_decay or 1.0
        groups = [{"params": list(b.parameters()), "lr_scale": decay**k} for k, b in enumerate(blocks)]
        in_blocks = {id(p) for g in groups for p in g["params"]}
        groups.append({"params": [p for p in self.model.parameters() if id(p) not in in_blocks], "lr_scale": 1.0})
        groups += [{"params": params, "lr_scale": 1.0} for head in heads if (params := list(head.parameters()))]
        cfg = self.cfg
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def embed(
        self, rows: torch.Tensor, flip: torch.Tensor | None = None, train_frozen: bool = False, shift: int = 0
    ) -> torch.Tensor:
        """Output at the recipe's layer for bank rows (mirrored where `flip`): the tail over the cached frozen
        features when there are any, else over the frozen part run now (with gradients if `train_frozen`); the
        frozen features moved by up to `shift` cells (`random_shift`)."""
        if self.cache is not None and (flip is None or self.flips):  # a cache without mirror images: compute
            return self.tail(random_shift(self.cached(rows, flip), shift))
        x = self.bank.batch(rows, flip).to(self.device)
        with contextlib.nullcontext() if train_frozen else torch.no_grad():
            z = self.frozen(x)
        return self.tail(random_shift(z, shift))

    def cached(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Cached frozen features of bank rows `idx` (the flipped variant where `flip`)."""
        return cached_rows(self.cache, idx, flip, self.flips, self.device)

    def prepare_phase(self, phase: int) -> None:
        """Train modes and gradients of `phase`; phase 1 computes the frozen part's features once (cache)."""
        set_phase(self.model, self.frozen, phase)
        if phase == 1 and self.cfg.cache_features and self.cache is None:
            # in a file beside --out, not the heap (`FeatureFile`): the same bytes, a fraction of the memory
            self.cache = self.shared.features(self.frozen, self.bank, self.device, self.cfg.cache_dtype, self.flips,
                                              self.out.parent)  # fmt: skip
            self.frozen.eval()
        if phase == 2:
            self.cache = None

    # ---- the loop
    @property
    def total_epochs(self) -> int:
        return self.cfg.phase1_epochs + self.cfg.phase2_epochs

    def phase(self, epoch: int) -> int:
        return 1 if epoch < self.cfg.phase1_epochs else 2

    def steps_per_epoch(self) -> int:
        if not hasattr(self, "_steps"):
            self._steps = len(self.batches(0))
        return self._steps

    def checkpoint(self, complete: bool = False) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_loss": list(self.epoch_loss),
            "step": self.step,
            "rng": rng_state(),
            "history": self.history,
            "best_auc": self.best_auc,
            "complete": complete,
            "config": self.cfg.identity(),
            "ema": self.average.state,
            "validation_paths": self.val_paths,
            **self.extra_state(),
        }

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch, self.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        total, n = ckpt.get("epoch_loss", (0.0, 0))  # checkpoints of older versions: the rest of the epoch only
        self.epoch_loss = (float(total), int(n))
        self.history, self.best_auc = list(ckpt["history"]), ckpt["best_auc"]
        self.average.state = ckpt.get("ema")
        self.load_extra_state(ckpt)
        set_rng_state(ckpt["rng"])
        log.info(
            "resuming %s at epoch %d, batch %d (step %d)", self.out, self.epoch + 1, self.batch_in_epoch, self.step
        )

    def save(self) -> None:
        save_atomic(self.checkpoint(), self.out)

    def fit(self, ckpt: dict | None) -> Path:
        """Train from the start, or from `ckpt`, to the end; returns the final checkpoint."""
        if ckpt is not None:
            self.restore(ckpt)
        with stop_on_signals(self.flag):
            if self.epoch < self.total_epochs:
                self.prepare_phase(self.phase(self.epoch))
            if ckpt is None:
                self.log_epoch({"epoch": 0, "phase": 0, **self.validation()})
            self.save()
            while self.epoch < self.total_epochs:
                phase = self.phase(self.epoch)
                self.prepare_phase(phase)
                t0, loss = time.perf_counter(), self.train_epoch(phase)
                seconds = time.perf_counter() - t0
                self.epoch, self.batch_in_epoch, self.epoch_loss = self.epoch + 1, 0, (0.0, 0)
                val = self.validation()
                auc = val["val_auc"]
                self.log_epoch(
                    {
                        "epoch": self.epoch,
                        "phase": phase,
                        "loss": loss,
                        **val,
                        "seconds": round(seconds, 2),
                        f"{self.unit}s_per_s": round(self.n_items() / max(seconds, 1e-9), 1),
                        "lr": self.lr_at(self.step - 1),
                    }
                )
                if self.cfg.keep_best and auc is not None and auc > self.best_auc:
                    self.best_auc = auc
                    with self.averaged():
                        best = {"model": self.model.state_dict(), "config": self.cfg.identity(), "epoch": self.epoch}
                        save_atomic({**best, "val_auc": auc}, self.best_path)
                self.draw()  # before the checkpoint, which stays the last write of an epoch
                self.save()
                log_memory(f"epoch {self.epoch}")
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
        total_loss, n = self.epoch_loss if self.batch_in_epoch else (0.0, 0)
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
                self.epoch_loss = (total_loss, n)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total_loss / n:.4f}")
                if self.flag["stop"]:
                    self.save()
                    self.check_stop()
        return total_loss / max(n, 1)

    def train_step(self, idx: torch.Tensor, phase: int) -> float:
        """One optimisation step on items `idx`; a non-finite loss stops training (nothing is saved)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
        with autocast(self.device, cpu_bf16=bool(self.cfg.bf16)):
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
        self.average.update(self.model)
        return loss.item()

    def averaged(self):
        """Inside, the model holds the moving average of its trained weights (with `cfg.ema`; else unchanged)."""
        return self.average.swapped_into(self.model)

    def log_epoch(self, record: dict) -> None:
        self.history.append(record)
        items = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"
        )
        log.info("epoch %d: %s", record["epoch"], items)
        if record.get("val_auc") is None and record["epoch"] == 0:
            log.info("no validation images: validation AUC is not measured")
        append_log(self.log_path, record)

    def validation(self) -> dict:
        """{"val_auc": AUC, TAR_KEY: TAR at FAR 1e-3} over all pairs of the validation images (`pipeline.metrics.roc`,
        exact); None values without two of them, or without a same-person or a different-person pair."""
        if len(self.val_rows) < 2:
            return {"val_auc": None, TAR_KEY: None}
        with torch.no_grad(), self.averaged():
            emb = self.embed_rows(torch.as_tensor(self.val_rows))
        m = all_pairs_metrics(emb, self.val_labels, self.metric)
        return {"val_auc": None if m is None else m["auc"], TAR_KEY: None if m is None else m["tar_at_far"]}

    def validate(self) -> float | None:
        """The validation AUC (None without two validation images)."""
        return self.validation()["val_auc"]

    def best_epoch(self) -> int | None:
        """Under `keep_best`, the trained epoch of highest validation AUC so far (the first of equals)."""
        scored = [r for r in self.history if r.get("loss") is not None and r.get("val_auc") is not None]
        if not self.cfg.keep_best or not scored:
            return None
        return max(scored, key=lambda r: r["val_auc"])["epoch"]

    def draw(self) -> None:
        """The training figure beside the checkpoint (NAME.training.png), from the history so far."""
        write_training_figure(self.figure_path, self.history, self.cfg.identity(), self.best_epoch())
        self.drawn = self.epoch

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Network (eval mode) output at the recipe's layer for bank rows; from the cache in phase 1. With
        `tta_flip`, the mean of the image's and its mirror image's outputs."""
        views = self.embed_views(rows)
        return views[0] if len(views) == 1 else (views[0] + views[1]) / 2

    def embed_views(self, rows: torch.Tensor, cpu_bf16: bool = False, batch: int = 64) -> list[torch.Tensor]:
        """`embed_rows` before the mean: [outputs] or, with `tta_flip`, [outputs, mirror images' outputs] (on the
        CPU in float32, or under bfloat16 autocast with `cpu_bf16`), `batch` rows at a time."""
        was = self.model.training
        self.model.eval()
        out: list[list[torch.Tensor]] = [[] for _ in range(2 if self.cfg.tta_flip else 1)]
        for idx in rows.split(batch):
            with autocast(self.device, cpu_bf16=cpu_bf16):
                for mirrored, views in enumerate(out):
                    flip = torch.ones(len(idx), dtype=torch.bool) if mirrored else None
                    views.append(self.embed(idx, flip).float().cpu())
        self.model.train(was)
        return [torch.cat(v) for v in out]

    def finish(self) -> Path:
        """The final checkpoint, marked complete (with the best epoch's weights under `keep_best`)."""
        ckpt = self.checkpoint(complete=True)
        if self.cfg.keep_best and self.best_path.exists():
            best = torch.load(self.best_path, map_location="cpu", weights_only=True)
            ckpt["model"], ckpt["best_epoch"] = best["model"], best["epoch"]
            log.info("keeping epoch %d (validation AUC %.4f)", best["epoch"], best["val_auc"])
        elif self.average.state:  # the final weights are the average's (`cfg.ema`)
            with self.averaged():
                ckpt["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        ckpt.update(self.final_fields(ckpt["model"]))
        save_atomic(ckpt, self.out)
        if self.drawn != self.epoch or not self.figure_path.exists():  # no epoch trained here, or killed before
            self.draw()
        log.info("wrote %s", self.out)
        return self.out
