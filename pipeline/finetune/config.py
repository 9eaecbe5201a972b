"""The options of `finetune`; a recipe (`pipeline.finetune.recipes.RECIPES`) fills those left unset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.embedding.embed import default_data_root
from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.finetune.recipes import RECIPES
from pipeline.nets import layers, models

# Fields that may change between a run and its resumption.
RUNTIME_FIELDS = ("out", "resume", "overwrite", "device", "workers")


class TrainingInterrupted(PipelineError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume` continues."""


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
    """A backbone of `pipeline.nets.models.BACKBONES`."""
    weights: str = "imagenet"
    """Starting weights: imagenet | none | PATH (state_dict or checkpoint)."""
    recipe: str = "study"
    """A recipe of `pipeline.finetune.recipes.RECIPES`: study (the study's method) | best (the project's)."""
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
    """Seed of initialisation, shuffling, dropout, flips and (without `split_seed`) the validation split."""
    split_seed: int | None = None
    """Best: seed of the validation split alone (None: `seed`), so that runs of other seeds hold out the same
    people (members of an ensemble are validated together)."""
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
    study_max: str = "with-batch"
    """Study: the maximum that normalises a batch's distances: with-batch (the study's: the largest seen, this
    batch included) | before-batch (the largest of the batches before; distances above it clipped just below 1)."""
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
    val_per_person: int = 10
    """At most this many validation images of one person (the held-out people drawn in a random order until
    `val_images`, `pipeline.finetune.validation.validation_rows`); 0: the rule before it, no cap."""
    loss: str | None = None
    """Best: pairs (every pair of P identities x K images, logistic on the cosine) | cosface (identities)."""
    images_per_person: int = 4
    """Best with loss pairs: K images of each identity in a batch (batch_size / K identities)."""
    margin: float = 0.2
    """Best: CosFace margin."""
    scale: float = 20.0
    """Best: scale of the cosine logits (CosFace or pairs)."""
    train_blocks: int | None = None
    """Best: how many of the last blocks train (SqueezeNet Fire modules 1-8, default 2; ResNet layers 1-4,
    default 1)."""
    pool: str | None = None
    """Best: the global pooling of the penultimate features: avg (the network's) | learned (a depthwise
    convolution over the last feature map, starting as the average; SqueezeNet and ResNet)."""
    lr_decay: float | None = None
    """Best: the k-th trained block below the last learns at lr x lr_decay^k (1: one rate for all)."""
    singletons: bool | None = None
    """Best with the pairs loss: people of the training split with one image train too, only in different-person
    pairs (each epoch spreads them over the P x K batches)."""
    feature_shift: int | None = None
    """Best: augmentation of the cached frozen features: each training map moved by a random 0 to N cells on both
    axes (SqueezeNet's last two Fire modules: 27 x 27 maps, about 8 pixels a cell), zeros moved in."""
    ema: float | None = None
    """Best: keep an exponential moving average of the trained weights (this decay per step; 0: none);
    validation, the best epoch and the final weights are the average's."""
    members: int | None = None
    """Best: train this many networks (member k > 0 with seed `seed` + 1000 k, all on the validation split of
    `seed`) and embed with all of them: an image's embedding is the concatenation of the members' unit-length
    embeddings, so its cosine similarity is the mean of the members'. OUT holds them all; each member's own
    checkpoint is OUT's name + `.member<k>.pt`."""
    cohort_top: int | None = None
    """Best: cohort score normalisation (`pipeline.embedding.cohort`; 0: none). The checkpoint keeps the embedding of the
    training images as a cohort; `embed` writes each image's offset, half the mean of its `cohort_top` largest
    cosines with the cohort, and `score` scores cos - o_i - o_j."""
    bf16: bool | None = None
    """On the CPU, train under bfloat16 autocast (weights, gradients, the loss, validation and `embed` stay
    float32): faster where the CPU computes bfloat16 natively (AVX-512 BF16, AMX), slower where it does not."""
    tta_flip: bool | None = None
    """Best: validation embeds an image as the mean of its own and its mirror image's features (test-time flip;
    `embed --tta-flip`)."""

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        if self.model not in models.BACKBONES:
            raise ValueError(f"model must be one of {sorted(models.BACKBONES)}, got {self.model!r}")
        if self.image_set not in lfw.IMAGE_DIRS:
            raise ValueError(f"image_set must be one of {sorted(lfw.IMAGE_DIRS)}, got {self.image_set!r}")
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
        if self.layer not in (None, *layers.LAYERS):
            raise ValueError(f"layer must be one of {layers.LAYERS}")
        if not 0 <= self.val_fraction < 1 or self.val_images < 0 or self.val_per_person < 0:
            raise ValueError("val_fraction must be in [0, 1), val_images and val_per_person >= 0")
        if self.study_max not in ("with-batch", "before-batch"):
            raise ValueError(f"study_max must be with-batch or before-batch, got {self.study_max!r}")
        if self.eps <= 0 or self.clip_norm <= 0:
            raise ValueError("eps and clip_norm must be > 0")
        if self.loss not in (None, *RECIPES[self.recipe].losses):
            losses = " or ".join(RECIPES[self.recipe].losses)
            raise ValueError(f"the {self.recipe} recipe trains with loss {losses}, got {self.loss!r}")
        if self.pool not in (None, "avg", "learned"):
            raise ValueError(f"pool must be avg or learned, got {self.pool!r}")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise ValueError("lr_decay must be in (0, 1]")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")
        if self.feature_shift is not None and self.feature_shift < 0:
            raise ValueError("feature_shift must be >= 0")
        if self.members is not None and self.members < 1:
            raise ValueError("members must be >= 1")
        if self.cohort_top is not None and self.cohort_top < 0:
            raise ValueError("cohort_top must be >= 0")
        if self.images_per_person < 2:
            raise ValueError("images_per_person must be >= 2")
        if self.resume and self.overwrite:
            raise ValueError("pass --resume or --overwrite, not both")

    def resolved(self) -> FinetuneConfig:
        """The configuration with every `None` replaced by the recipe's preset for this model."""
        preset = RECIPES[self.recipe].values(self.model)
        return replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    def identity(self) -> dict:
        """What defines the training (JSON-safe): all fields but the run-time ones."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}
