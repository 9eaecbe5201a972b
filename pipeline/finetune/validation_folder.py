"""The kept network's validation scores as a results folder beside the checkpoint: OUT.validation/ (what `score`
writes) from the store OUT.validation.h5, the validation images embedded as `run` embeds the test sets (the
recipe's test-time flip and scales, the checkpoint's cohort; from the training's feature cache where it holds
them), so that `compare` can weigh two recipes, and `score --threshold-from` carry a threshold, on held-out
training people instead of the test."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline import outputs
from pipeline.embedding.embed import EmbedConfig
from pipeline.embedding.shared import embed_from_frozen, embed_together
from pipeline.errors import PipelineError
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.features import Handover
from pipeline.finetune.recipes import RECIPES
from pipeline.finetune.split import training_split
from pipeline.report.results import RESULT_FILES, recognise_results_folder
from pipeline.runtime import resolve_device
from pipeline.scoring.stage import score_store
from pipeline.store.layout import recognise_store

log = logging.getLogger(__name__)


def validation_outputs(out: Path) -> tuple[Path, Path]:
    """(store, results folder) beside the checkpoint `out`: NAME.validation.h5, NAME.validation/."""
    out = Path(out)
    return out.with_name(out.stem + ".validation.h5"), out.with_name(out.stem + ".validation")


def check_validation_outputs(out: Path, replace_ours: bool) -> None:
    """Before training: the validation store and folder beside `out` are absent, or (with `replace_ours`:
    --overwrite, --resume) a store and a results folder this tool wrote."""
    for path, recognise, what in zip(
        validation_outputs(out), (recognise_store, recognise_results_folder), ("store", "results folder"), strict=True
    ):
        if os.path.lexists(path) and not replace_ours:
            raise PipelineError(
                f"{path} exists beside --out {out} (finetune writes its validation {what} there): move it away, or "
                f"pass --overwrite to start over if an earlier finetune run wrote it"
            )
        outputs.check_replaceable(path, True, recognise, f"validation {what} of an earlier finetune run")


def write_validation_folder(cfg: FinetuneConfig, checkpoint: Path, shared: Handover | None = None) -> Path | None:
    """Embed the validation images of `cfg` with `checkpoint` into NAME.validation.h5 and score all their pairs
    into NAME.validation/; returns the folder (None, with a message, when there is nothing to score). Where the
    training's feature cache (`shared`) holds the frozen part's outputs for these images, the network's tail runs on
    them, as validation during training did (the images are not decoded again); else the images are embedded."""
    cfg = cfg.resolved()
    faces = replace(training_split(cfg).validation, split="validation")
    people = len(np.unique(faces.labels))
    if people in (0, 1, len(faces)):
        log.info("no validation results folder: the validation images hold no same-person or no different-person pair")
        return None
    store, folder = validation_outputs(checkpoint)
    embed = EmbedConfig(
        out=store, data_root=cfg.data_root, image_set=cfg.image_set, protocol="people", split="train",
        model=cfg.model, weights=str(checkpoint), layer=cfg.layer, tta_flip=bool(cfg.tta_flip),
        tta_resizes=RECIPES[cfg.recipe].tta_resizes, batch_size=16, workers=cfg.workers, device=cfg.device,
        overwrite=True, seed=cfg.seed,
    )  # fmt: skip
    log.info("validation results: %d images of %d held-out people -> %s", len(faces), people, folder)
    files = [faces.absolute(i) for i in range(len(faces))]
    cached = shared.frozen_outputs(files, embed.tta_flip, resolve_device(cfg.device)) if shared else None
    if shared is not None:
        shared.held.clear()  # decoded images kept for training go before the embedding (the cache stays in `cached`)
    made = None
    if cached is not None:
        source = f"finetune's cached features ({cfg.cache_dtype})"
        made = embed_from_frozen(embed, faces, *cached, blocks=cfg.train_blocks, source=source)
    if made is None:
        embed_together([embed], faces=[faces])
    metric = "l2" if cfg.layer == "output" else "cosine"
    label = f"{cfg.model} {cfg.recipe} seed {cfg.seed}, validation"
    score_store(store, folder, metric=metric, label=label, overwrite=True, device=cfg.device)
    return folder


def validation_folder_done(checkpoint: Path) -> bool:
    """Both the store and the results folder of `checkpoint` are there (a resumed, complete run keeps them)."""
    store, folder = validation_outputs(checkpoint)
    return store.is_file() and (folder / "metrics.json").is_file()


def remove_validation_outputs(checkpoint: Path) -> None:
    """Remove an earlier run's store and results folder (recognised by `check_validation_outputs`): a fresh run
    killed before its end must not leave them looking like its own."""
    store, folder = validation_outputs(checkpoint)
    store.unlink(missing_ok=True)
    if folder.is_dir():
        outputs.remove_own_files(folder, RESULT_FILES)
