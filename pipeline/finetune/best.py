"""The `best` recipe, the project's own: identities of peopleDevTrain (a tenth of the people held out for
validation), a cosine loss on the penultimate features (every pair of P identities x K images, or CosFace),
horizontal flips, a cosine learning-rate schedule, the last blocks (`train_blocks`, per-block `lr_decay`) trained
on cached early features, an optional learned pooling and test-time flip, the checkpoint of best validation AUC
kept; chosen by validation AUC on held-out training people (docs/finetuning.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch

from pipeline.faces import lfw
from pipeline.finetune.cohort import cohort_fields
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.features import Handover
from pipeline.finetune.loop import Trainer
from pipeline.finetune.losses import LOSSES
from pipeline.finetune.recipes import KNOBS_OFF, Recipe, register
from pipeline.finetune.split import TrainingSplit, training_split
from pipeline.finetune.validation import random_people, validation_rows
from pipeline.nets import models

log = logging.getLogger(__name__)


def identity_batches(groups: list[torch.Tensor], k: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """P identities x K images: a random K images of each group (identity), groups shuffled, batch_size / K
    groups per batch; a last batch of one identity joins the one before (a batch needs two identities)."""
    picks = [
        groups[i][torch.randperm(len(groups[i]), generator=g)[:k]] for i in torch.randperm(len(groups), generator=g)
    ]
    per_batch = max(2, batch_size // k)
    out = [picks[i : i + per_batch] for i in range(0, len(picks), per_batch)]
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2] += out.pop()
    return [torch.cat(b) for b in out]


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Half a cosine from `peak` at step 0 to 0 at step `total` (and after)."""
    return 0.5 * peak * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def best_split(faces: Mapping[str, lfw.FaceSet], cfg: FinetuneConfig) -> TrainingSplit:
    """The best recipe's images: a random `val_fraction` of peopleDevTrain's people held out (seeded by
    `split_seed`, else `seed`), up to `val_images` of their images for validation (`validation_rows`); the other people's images train
    (those with two or more images only, for a per-identity loss without `singletons`), the first `max_pairs`."""
    people = faces["people"]
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    held = random_people(len(people.identities), cfg.val_fraction, seed)
    train = ~np.isin(people.labels, held)
    if LOSSES[cfg.loss].per_identity and not cfg.singletons:  # pairs need two images of a person
        train &= np.bincount(people.labels)[people.labels] >= 2
    train_rows = np.flatnonzero(train)[: cfg.max_pairs]
    validation = people.subset(validation_rows(people.labels, held, cfg.val_images, cfg.val_per_person, seed))
    source = f"{len(held):,} of peopleDevTrain's {len(people.identities):,} people held out by split seed {seed}"
    return TrainingSplit(people.subset(train_rows), validation, held, source)


class BestTrainer(Trainer):
    """The project's recipe: identities of peopleDevTrain, a cosine pair loss (or CosFace) on the penultimate
    features, flips, cosine learning rate, the last `train_blocks` blocks trained on cached early features."""

    unit = "img"

    def __init__(self, cfg: FinetuneConfig, device: torch.device, shared: Handover | None = None):
        super().__init__(cfg, device, shared)
        self.flips = cfg.flip
        split = training_split(cfg)
        self.load_images(split)
        classes, labels = np.unique(split.train.labels, return_inverse=True)
        self.train_labels = torch.as_tensor(labels, dtype=torch.int64)
        by_person = torch.as_tensor(labels).argsort(stable=True).split(np.bincount(labels).tolist())
        self.groups = [g for g in by_person if len(g) >= 2]
        self.singles = torch.cat([g for g in by_person if len(g) == 1] or [torch.zeros(0, dtype=torch.int64)])
        """With `singletons`: images of people with one image, added to the batches as different-person pairs."""
        self.n_train = len(split.train)
        loss = LOSSES[cfg.loss]
        b = models.backbone(cfg.model)
        dim = b.penultimate_dim if cfg.layer == "penultimate" else b.output_dim
        self.head = loss.from_config(cfg, dim=dim, n_classes=len(classes)).to(device)
        self.optimizer = self.sgd(self.head)
        log.info(
            "best recipe (%s loss): %d training images of %d people, %d validation images of %d of the %d "
            "held-out people",
            cfg.loss,
            self.n_train,
            len(classes),
            len(self.val_rows),
            len(np.unique(self.val_labels)),
            len(split.held),
        )

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """A shuffle of the images, or P identities x K images (a random K of each) for a `per_identity` loss."""
        if not self.head.per_identity:
            return super().batches(epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        batches = identity_batches(self.groups, self.cfg.images_per_person, self.cfg.batch_size, g)
        if not len(self.singles):
            return batches
        singles = self.singles[torch.randperm(len(self.singles), generator=g)].tensor_split(len(batches))
        return [torch.cat([b, s]) for b, s in zip(batches, singles, strict=True)]

    def n_items(self) -> int:
        if not self.head.per_identity:
            return self.n_train
        return sum(min(len(g), self.cfg.images_per_person) for g in self.groups) + len(self.singles)

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_epochs * self.steps_per_epoch(), self.cfg.lr)

    def final_fields(self, state: dict) -> dict:
        """The cohort of a network trained on its own (`cohort_top`; members of an ensemble get theirs joined)."""
        if not self.cfg.cohort_top or self.n_train == 0:
            return {}
        return cohort_fields(self, [state], self.cfg.cohort_top)

    def extra_state(self) -> dict:
        return {"head": self.head.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])

    def prepare_phase(self, phase: int) -> None:
        super().prepare_phase(phase)
        self.head.train()

    def loss_of(self, idx: torch.Tensor, phase: int) -> torch.Tensor:
        flip = torch.randint(0, 2, (len(idx),), dtype=torch.bool) if self.flips else None
        emb = self.embed(idx, flip, train_frozen=phase == 2, shift=self.cfg.feature_shift or 0)
        with torch.autocast(self.device.type, enabled=False):  # cosines in float32 under any autocast
            return self.head(emb.float(), self.train_labels[idx].to(self.device))


BEST = register(
    Recipe(
        name="best",
        trainer=BestTrainer,
        summary="the project's recipe (docs/finetuning.md)",
        protocols=("people",),
        split=best_split,
        preset=dict(
            KNOBS_OFF,
            batch_size=128,
            lr=0.01,
            momentum=0.9,
            phase1_epochs=40,
            phase2_epochs=0,
            weight_decay=5e-4,
            cache_dtype="float16",
            flip=True,
            keep_best=True,
            layer="penultimate",
            loss="pairs",
            tta_flip=True,
            pool="learned",
            bf16=True,
            members=3,
            cohort_top=100,
        ),
        losses=("pairs", "cosface"),
        # no test-time scales: weighed on validation (issue 27, docs/finetuning.md), they gave no gain beyond
        # noise for three embeddings per image; `run --tta-resizes 240,272` adds them back
        tta_resizes=(),
    )
)
