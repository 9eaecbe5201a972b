"""The `finetune` stage: turn an ImageNet CNN into a face-verification network.

The recipes, one `Recipe` each in `RECIPES` (a new recipe is a module that registers its entry, imported here):

- `study`, the study's method, faithful: Siamese pairs of `pairsDevTrain` through one network, the
  normalised Euclidean distance of the outputs against 0 = same / 1 = different with binary cross entropy,
  SGD with momentum, gradient norm clipped; phase 1 trains the classifier on frozen convolutional features
  (computed once and cached: same mathematics, dropout included), phase 2 the whole network.
- `best`, the project's own: identities of `peopleDevTrain` (a tenth of the people held out for
  validation), a cosine pair loss over P x K batches on the penultimate features, horizontal flips, cosine
  learning rate, the last blocks (`train_blocks`, per-block `lr_decay`) trained on cached early features, an
  optional learned pooling and test-time flip, the checkpoint of best validation AUC kept.

A checkpoint (model, optimizer, epoch, step, running state, RNG states, config, the history of training loss,
validation AUC and TAR at FAR 1e-3) is written atomically after every epoch and on SIGINT/SIGTERM; `resume`
continues it and ends with the weights of an uninterrupted run. After every epoch the history is also drawn
beside the checkpoint (NAME.training.png).

Modules: `config` (the options), `recipes` (the registry: one `Recipe` per recipe, its trainer and preset),
`study` and `best` (the recipes: `StudyTrainer`, `BestTrainer`, hooks of the loop), `losses` (one class each, by
name), `loop` (the one training loop, `Trainer`), `hooks` (what a recipe answers the loop, with defaults),
`checkpoint` (the files a run writes, RNG states, signals), `features` (image bank, feature cache), `validation`
(held-out people, AUC), `averaging` (the optional moving average of the trained weights), `ensemble` (several
members of one recipe and the checkpoint that joins them), `joined` (their joined embedding), `cohort` (the
cohort a checkpoint keeps), `split` (the images each recipe trains and validates on), `overlap` (`embed`'s warning
where a face set holds a checkpoint's training people), `validation_folder` (the kept network's validation
results folder, NAME.validation/). Splitting a backbone into a frozen part and a tail:
`pipeline.nets.split`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.finetune.best import BestTrainer, cosine_lr, identity_batches
from pipeline.finetune.checkpoint import (
    load_checkpoint,
    recognise_checkpoint,
    recognise_log,
    recognise_training_figure,
    side_files,
    write_training_figure,
)
from pipeline.finetune.config import RUNTIME_FIELDS, FinetuneConfig, TrainingInterrupted
from pipeline.finetune.ensemble import member_configs, member_path, train_ensemble
from pipeline.finetune.features import Handover, random_shift
from pipeline.finetune.loop import Trainer
from pipeline.finetune.losses import LOSSES, BatchPairLoss, CosFaceLoss, StudyLoss
from pipeline.finetune.recipes import RECIPES, Recipe
from pipeline.finetune.study import StudyTrainer, study_pairs
from pipeline.finetune.validation import all_pairs_auc, all_pairs_metrics
from pipeline.finetune.validation_folder import (
    check_validation_outputs,
    remove_validation_outputs,
    validation_folder_done,
    write_validation_folder,
)
from pipeline.runtime import (
    give_back_freed_memory,
    keep_freed_memory,
    log_memory,
    repeatable_training,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

__all__ = [
    "LOSSES",
    "RECIPES",
    "RUNTIME_FIELDS",
    "BatchPairLoss",
    "BestTrainer",
    "CosFaceLoss",
    "FinetuneConfig",
    "Recipe",
    "StudyLoss",
    "StudyTrainer",
    "Trainer",
    "TrainingInterrupted",
    "all_pairs_auc",
    "all_pairs_metrics",
    "check_outputs",
    "cosine_lr",
    "finetune",
    "identity_batches",
    "member_configs",
    "member_path",
    "random_shift",
    "recognise_training_figure",
    "study_pairs",
    "write_training_figure",
]


def check_outputs(cfg: FinetuneConfig) -> None:
    """Refuse what would replace or delete a file this command did not write: the checkpoint is replaced only
    with --overwrite (and when it is ours); its log, best-epoch file and training figure only when the
    checkpoint is replaced or, with --resume, when a killed run left them without a checkpoint."""
    out = Path(cfg.out)
    weights = [Path(cfg.weights)] if cfg.weights not in ("imagenet", "none") else []
    outputs.check_file_out(out, inputs=weights)
    if out in side_files(out):
        raise PipelineError(f"--out {out} would be its own log, best-epoch file or figure: pass a name ending in .pt")
    figure = side_files(out)[2]
    check_validation_outputs(out, cfg.overwrite or cfg.resume)
    if cfg.resume and out.exists():  # load_checkpoint checks it; the log and best file go on, the figure is redrawn
        if os.path.lexists(figure):
            outputs.check_replaceable(figure, True, recognise_training_figure, "training figure of finetune")
        return
    if out.exists():
        outputs.check_replaceable(out, cfg.overwrite, recognise_checkpoint, "finetune checkpoint")
    fresh_ok = cfg.overwrite or cfg.resume  # starting over on purpose, or after a run killed before its checkpoint
    recognisers = (recognise_log, recognise_checkpoint, recognise_training_figure)
    for path, recognise in zip(side_files(out), recognisers, strict=True):
        if os.path.lexists(path) and not fresh_ok:
            raise PipelineError(
                f"{path} exists beside --out {out} (finetune writes its validation log, best epoch and training "
                f"figure there): move it away, or pass --overwrite to start over if an earlier finetune run wrote it"
            )
        if os.path.lexists(path):
            outputs.check_replaceable(path, True, recognise, "file of an earlier finetune run")


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune `cfg.model` with `cfg.recipe`; returns the final checkpoint (OUT). With `members` > 1, the
    members one after the other, then OUT holding them all (`pipeline.finetune.ensemble`). Then the kept
    network's validation results beside it (`pipeline.finetune.validation_folder`)."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    members = member_configs(cfg)

    def check() -> None:
        for c in (cfg, *members):
            check_outputs(c)

    with outputs.claim(out, check), repeatable_training(resolve_device(cfg.device)):
        if not (cfg.resume and out.exists()):
            remove_validation_outputs(out)
        shared = Handover()  # the training's images and feature cache, kept for the validation results
        if not members:
            _finetune(cfg, out, shared)
        elif cfg.resume and out.exists() and load_checkpoint(out, cfg).get("complete"):
            log.info("%s is already complete", out)
        else:
            train_ensemble(cfg, members, lambda c, shared: _finetune(c, Path(c.out), shared), _trainer, shared)
        if not validation_folder_done(out):
            give_back_freed_memory()  # training's transient memory, before the embedding's own
            write_validation_folder(cfg, out, shared)
            log_memory("validation results")
        return out


def _trainer(cfg: FinetuneConfig, shared: Handover | None = None) -> Trainer:
    return RECIPES[cfg.recipe].trainer(cfg, resolve_device(cfg.device), shared)


def _finetune(cfg: FinetuneConfig, out: Path, shared: Handover | None = None) -> Path:
    ckpt = None
    figure = side_files(out)[2]
    outputs.recover_leftovers(figure, ())  # a killed run's temporary figure
    if out.exists() and cfg.resume:
        ckpt = load_checkpoint(out, cfg)
        if ckpt.get("complete"):
            if not os.path.lexists(figure):  # a checkpoint of a version that did not draw it
                write_training_figure(figure, ckpt["history"], ckpt["config"], ckpt.get("best_epoch"))
            log.info("%s is already complete; nothing to do", out)
            return out
    elif cfg.resume:
        log.warning("no checkpoint at %s: starting from the beginning", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is None:  # check_outputs recognised these as an earlier run's of this output
        for path in side_files(out):
            path.unlink(missing_ok=True)
    device = resolve_device(cfg.device)
    keep_freed_memory()
    if cfg.bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("this CPU has no native bfloat16 arithmetic: --bf16 will train slower; pass --no-bf16")
    seed_everything(cfg.seed)
    trainer = RECIPES[cfg.recipe].trainer(cfg, device, shared)
    log.info("config: %s", json.dumps(cfg.identity()))
    return trainer.fit(ckpt)
