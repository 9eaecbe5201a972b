"""Which people a fine-tuning run sees: the images it trains on, validates on and keeps as its cohort, all drawn
from View 1's training files (peopleDevTrain, and pairsDevTrain for the study's recipe). Each recipe answers
with one pure function of those face sets and its configuration (`Recipe.split`); the trainers use it, and so
do the test that proves the test splits share no person with it and `embed`'s overlap warning
(`pipeline.finetune.overlap`), without building a network."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.faces import lfw
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.recipes import RECIPES

SPLIT_FIELDS = (
    "data_root", "image_set", "recipe", "seed", "split_seed", "val_fraction", "val_images", "val_per_person",
    "max_pairs", "loss", "singletons",
)  # fmt: skip
"""The `FinetuneConfig` fields a recipe's split reads: a checkpoint whose config lacks one cannot tell its people."""


@dataclass(frozen=True)
class TrainingSplit:
    """The images of one fine-tuning run, as face sets over the training files' identities."""

    train: lfw.FaceSet
    """The images the network trains on (best: rows of peopleDevTrain; study: the images of the pairsDevTrain
    pairs it trains on, with those pairs)."""
    validation: lfw.FaceSet
    """Up to `val_images` images of the held-out people, at most `val_per_person` of each
    (`validation.validation_rows`), rows of peopleDevTrain."""
    held: np.ndarray
    """Identity indices (into peopleDevTrain's `identities`) of the held-out people."""
    source: str = ""
    """How the recipe chose them, in words (for messages)."""

    @property
    def cohort(self) -> lfw.FaceSet:
        """The images whose embedding the checkpoint keeps as its cohort (`cohort_top`): the training images."""
        return self.train

    def people(self, part: str) -> set[str]:
        """The names of the people of `part`: train, validation or cohort."""
        faces = getattr(self, part)
        return {faces.identities[i] for i in np.unique(faces.labels)}


def training_faces(data_root, image_set: str, protocols: tuple[str, ...]) -> dict[str, lfw.FaceSet]:
    """The training split of each of `protocols` (people, pairs) under `data_root`."""
    return {p: lfw.load_protocol(data_root, image_set, p, "train") for p in protocols}


def training_split(cfg: FinetuneConfig, faces: Mapping[str, lfw.FaceSet] | None = None) -> TrainingSplit:
    """The split of `cfg`'s recipe (the preset filled in), from `faces` (protocol -> its training face set) or,
    without them, from the files under `cfg.data_root`."""
    cfg = cfg.resolved()
    recipe = RECIPES[cfg.recipe]
    if faces is None:
        faces = training_faces(cfg.data_root, cfg.image_set, recipe.protocols)
    return recipe.split(faces, cfg)
