"""The recipes of `finetune`, one entry each in `RECIPES`: the trainer (the loop's hooks), the images it trains
and validates on (its split, `pipeline.finetune.split`), the values of the options it leaves to the recipe (its
preset), the losses it trains with and the test-time scales `run` embeds its networks with. Each recipe's module
registers its entry (`pipeline.finetune.study`, `pipeline.finetune.best`); the package imports them all, so
`RECIPES` is complete once `pipeline.finetune` is imported."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe."""

    name: str
    """Its name (`finetune --recipe NAME`)."""
    trainer: type
    """The `pipeline.finetune.loop.Trainer` subclass whose hooks make the recipe."""
    summary: str
    """One line for `--help`."""
    protocols: tuple[str, ...]
    """The View 1 training files it reads (`people`: peopleDevTrain, `pairs`: pairsDevTrain)."""
    split: Callable[..., Any]
    """(faces, cfg) -> `pipeline.finetune.split.TrainingSplit`: its training, validation and cohort images, a pure
    function of the training face sets of `protocols` (protocol -> `FaceSet`) and the resolved configuration."""
    preset: Mapping[str, Any]
    """Values of the `FinetuneConfig` fields the user leaves unset (None)."""
    model_presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Values for one backbone over `preset`."""
    losses: tuple[str, ...] = ()
    """The losses (`pipeline.finetune.losses.LOSSES`) its trainer trains with (the preset's among them)."""
    tta_resizes: tuple[int, ...] = ()
    """Test-time scales `run` embeds the recipe's fine-tuned network with (`EmbedConfig.tta_resizes`): chosen on
    validation, not used in training (validation during training uses the one centre crop)."""

    def values(self, model: str) -> dict[str, Any]:
        """The preset for the backbone `model`."""
        return {**self.preset, **self.model_presets.get(model, {})}


KNOBS_OFF: dict[str, Any] = dict(
    tta_flip=False, lr_decay=1.0, pool="avg", bf16=False, feature_shift=0, singletons=False, ema=0.0, members=1,
    cohort_top=0,
)  # fmt: skip
"""The value of each optional knob of training that leaves it off (the study's recipe has none on): a preset
starts from these."""

RECIPES: dict[str, Recipe] = {}
"""Every recipe by name, in the order registered."""


def register(recipe: Recipe) -> Recipe:
    """Add `recipe` to `RECIPES` (a name registered twice is a programming error)."""
    if recipe.name in RECIPES:
        raise RuntimeError(f"recipe {recipe.name!r} is registered twice")
    if recipe.preset.get("loss") not in recipe.losses:
        raise RuntimeError(f"recipe {recipe.name!r}: its preset's loss is not one of its losses {recipe.losses}")
    RECIPES[recipe.name] = recipe
    return recipe
