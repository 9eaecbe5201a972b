"""Training losses, one class each, by the name `FinetuneConfig.loss` gives (a recipe lists the ones it trains
with, `Recipe.losses`). Each builds itself from the configuration (`from_config`) and says how a batch must be
drawn (`per_identity`: P identities x K images, else a shuffle)."""

from __future__ import annotations

from torch import nn

from pipeline.finetune.losses.cosface import CosFaceLoss
from pipeline.finetune.losses.pairs import BatchPairLoss
from pipeline.finetune.losses.study import StudyLoss

LOSSES: dict[str, type[nn.Module]] = {"study": StudyLoss, "pairs": BatchPairLoss, "cosface": CosFaceLoss}

__all__ = ["LOSSES", "BatchPairLoss", "CosFaceLoss", "StudyLoss"]
