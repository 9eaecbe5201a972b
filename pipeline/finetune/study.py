"""The `study` recipe: the study's Siamese pairs of pairsDevTrain through one network, the normalised Euclidean
distance of the outputs against 0 = same / 1 = different with binary cross entropy (`StudyLoss`), SGD with
momentum at a constant learning rate; phase 1 trains the classifier on frozen convolutional features, phase 2
the whole network."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from pipeline.faces import lfw
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.features import Handover
from pipeline.finetune.loop import Trainer
from pipeline.finetune.losses import LOSSES
from pipeline.finetune.recipes import KNOBS_OFF, Recipe, register
from pipeline.finetune.split import TrainingSplit, training_split
from pipeline.finetune.validation import unpaired_people, validation_rows

log = logging.getLogger(__name__)


def study_pairs(proto: lfw.FaceSet, max_pairs: int | None) -> lfw.FaceSet:
    """All pairs, or the first ceil(N/2) same and first floor(N/2) different pairs."""
    if max_pairs is None or max_pairs >= len(proto.pairs):
        return proto
    same = np.flatnonzero(proto.pair_labels == 1)[: max_pairs - max_pairs // 2]
    diff = np.flatnonzero(proto.pair_labels == 0)[: max_pairs // 2]
    return proto.select_pairs(np.concatenate([same, diff]))


def study_split(faces: Mapping[str, lfw.FaceSet], cfg: FinetuneConfig) -> TrainingSplit:
    """The study recipe's images: those of the pairsDevTrain pairs it trains on (`study_pairs`); validation: up to
    `val_images` images of the peopleDevTrain people that appear in no pairsDevTrain pair (the study trains on all
    pairs), drawn as `validation_rows` draws them with seed 0. No seed enters: every run validates on the same images."""
    people, all_pairs = faces["people"], faces["pairs"]
    held = unpaired_people(people, all_pairs)
    validation = people.subset(validation_rows(people.labels, held, cfg.val_images, cfg.val_per_person, 0))
    source = "the pairs of pairsDevTrain; held out: the peopleDevTrain people in no pair"
    return TrainingSplit(study_pairs(all_pairs, cfg.max_pairs), validation, held, source)


class StudyTrainer(Trainer):
    """The study's Siamese recipe on pairsDevTrain."""

    unit = "pair"

    def __init__(self, cfg: FinetuneConfig, device: torch.device, shared: Handover | None = None):
        super().__init__(cfg, device, shared)
        split = training_split(cfg)
        self.load_images(split)
        pairs = split.train
        self.pairs = torch.as_tensor(pairs.pairs)
        self.different = torch.as_tensor(1 - pairs.pair_labels.astype(np.int64))
        self.loss = LOSSES[cfg.loss].from_config(cfg).to(device)
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


STUDY = register(
    Recipe(
        name="study",
        trainer=StudyTrainer,
        summary="the study's Siamese recipe",
        protocols=("pairs", "people"),
        split=study_split,
        # The study's values (AlexNet's; VGG-16 below); other models take AlexNet's.
        preset=dict(
            KNOBS_OFF,
            batch_size=22,
            lr=1e-4,
            momentum=0.9,
            phase1_epochs=5,
            phase2_epochs=15,
            weight_decay=0.0,
            cache_dtype="float32",
            flip=False,
            keep_best=False,
            layer="output",
            loss="study",
        ),
        model_presets={"vgg16": dict(batch_size=4, phase1_epochs=3, phase2_epochs=2)},
        losses=("study",),
    )
)
