"""The two recipes as hooks of the one loop: which items and batches, which loss, which learning rate.

- `study` (`StudyTrainer`): the study's Siamese pairs of pairsDevTrain, normalised Euclidean distance
  against 0 = same / 1 = different with binary cross entropy, constant learning rate.
- `best` (`BestTrainer`): identities of peopleDevTrain, a cosine loss on the penultimate features (every pair
  of P identities x K images, or CosFace), horizontal flips, cosine learning-rate schedule.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.faces import lfw
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.features import Handover
from pipeline.finetune.loop import Trainer
from pipeline.finetune.losses import BatchPairLoss, CosFaceLoss, StudyLoss
from pipeline.finetune.validation import random_people, unpaired_people
from pipeline.nets import models

log = logging.getLogger(__name__)


def study_pairs(proto: lfw.FaceSet, max_pairs: int | None) -> lfw.FaceSet:
    """All pairs, or the first ceil(N/2) same and first floor(N/2) different pairs."""
    if max_pairs is None or max_pairs >= len(proto.pairs):
        return proto
    same = np.flatnonzero(proto.pair_labels == 1)[: max_pairs - max_pairs // 2]
    diff = np.flatnonzero(proto.pair_labels == 0)[: max_pairs // 2]
    return proto.select_pairs(np.concatenate([same, diff]))


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


class StudyTrainer(Trainer):
    """The study's Siamese recipe on pairsDevTrain."""

    unit = "pair"

    def __init__(self, cfg: FinetuneConfig, device: torch.device, shared: Handover | None = None):
        super().__init__(cfg, device, shared)
        all_pairs = lfw.load_protocol(cfg.data_root, cfg.image_set, "pairs", "train")
        pairs = study_pairs(all_pairs, cfg.max_pairs)
        people = lfw.load_protocol(cfg.data_root, cfg.image_set, "people", "train")
        # Validation: training people that appear in no pairsDevTrain pair (the study trains on all pairs).
        self.load_images(pairs, people, unpaired_people(people, all_pairs))
        self.pairs = torch.as_tensor(pairs.pairs)
        self.different = torch.as_tensor(1 - pairs.pair_labels.astype(np.int64))
        self.loss = StudyLoss(cfg.eps).to(device)
        self.optimizer = self.sgd(self.loss)
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

    def loss_of(self, idx: torch.Tensor, phase: int) -> torch.Tensor:
        pairs = self.pairs[idx]
        rows = torch.cat([pairs[:, 0], pairs[:, 1]])
        if phase == 2 and self.cfg.layer != "output":
            # as before the package split: phase 2 trains the network's output whatever `layer` says
            out = self.model(self.bank.batch(rows).to(self.device))
        else:
            out = self.embed(rows, train_frozen=phase == 2)
        a, b = out.float().chunk(2)
        with torch.autocast(self.device.type, enabled=False):  # the loss in float32 under any autocast
            return self.loss(a, b, self.different[idx].to(self.device))


class BestTrainer(Trainer):
    """The project's recipe: identities of peopleDevTrain, a cosine pair loss (or CosFace) on the penultimate
    features, flips, cosine learning rate, the last `train_blocks` blocks trained on cached early features."""

    unit = "img"

    def __init__(self, cfg: FinetuneConfig, device: torch.device, shared: Handover | None = None):
        super().__init__(cfg, device, shared)
        self.flips = cfg.flip
        people = lfw.load_protocol(cfg.data_root, cfg.image_set, "people", "train")
        held = random_people(
            len(people.identities), cfg.val_fraction, cfg.seed if cfg.split_seed is None else cfg.split_seed
        )
        train = ~np.isin(people.labels, held)
        if cfg.loss == "pairs" and not cfg.singletons:  # pairs need two images of a person
            train &= np.bincount(people.labels)[people.labels] >= 2
        train_rows = np.flatnonzero(train)[: cfg.max_pairs]
        self.load_images(people.subset(train_rows), people, held)
        classes, labels = np.unique(people.labels[train_rows], return_inverse=True)
        self.train_labels = torch.as_tensor(labels, dtype=torch.int64)
        by_person = torch.as_tensor(labels).argsort(stable=True).split(np.bincount(labels).tolist())
        self.groups = [g for g in by_person if len(g) >= 2]
        self.singles = torch.cat([g for g in by_person if len(g) == 1] or [torch.zeros(0, dtype=torch.int64)])
        """With `singletons`: images of people with one image, added to the batches as different-person pairs."""
        self.n_train = len(train_rows)
        b = models.backbone(cfg.model)
        dim = b.penultimate_dim if cfg.layer == "penultimate" else b.output_dim
        if cfg.loss == "cosface":
            self.head = CosFaceLoss(dim, len(classes), cfg.scale, cfg.margin).to(device)
        else:
            self.head = BatchPairLoss(cfg.scale).to(device)
        self.optimizer = self.sgd(self.head)
        log.info(
            "best recipe (%s loss): %d training images of %d people, %d validation images of %d held-out people",
            cfg.loss,
            self.n_train,
            len(classes),
            len(self.val_rows),
            len(held),
        )

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """cosface: a shuffle of the images; pairs: P identities x K images (a random K of each)."""
        if self.cfg.loss == "cosface":
            return super().batches(epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        batches = identity_batches(self.groups, self.cfg.images_per_person, self.cfg.batch_size, g)
        if not len(self.singles):
            return batches
        singles = self.singles[torch.randperm(len(self.singles), generator=g)].tensor_split(len(batches))
        return [torch.cat([b, s]) for b, s in zip(batches, singles, strict=True)]

    def n_items(self) -> int:
        if self.cfg.loss == "cosface":
            return self.n_train
        return sum(min(len(g), self.cfg.images_per_person) for g in self.groups) + len(self.singles)

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_epochs * self.steps_per_epoch(), self.cfg.lr)

    def final_fields(self, state: dict) -> dict:
        """The cohort of a network trained on its own (`cohort_top`; members of an ensemble get theirs joined)."""
        if not self.cfg.cohort_top or self.n_train == 0:
            return {}
        from pipeline.finetune.cohort import cohort_fields  # (it builds on the loop, like this module)

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
