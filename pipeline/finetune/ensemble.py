"""Ensembles (`FinetuneConfig.members`): N networks of one recipe that differ only in their seed, trained one
after the other on the same training images and validation split (decoded images and cached features are
handed from one member to the next), then one checkpoint OUT that holds them all.

Member k is an ordinary `finetune` run (its own checkpoint OUT.member<k>.pt, log and figure; resumed or reused
like any other) with seed `seed` + 1000 k, so that the members of runs with seeds 0, 1, 2 are all different
networks. OUT holds member 0's weights as `model` and the others' as `members`; `embed --weights OUT` builds
`pipeline.nets.split.Ensemble` from it: the shared frozen part runs once, and an image's embedding is the concatenation of
the members' unit-length embeddings (cosine similarity: the mean of the members'). The ensemble is validated the
same way, and OUT's history holds each member's records (tagged "member": k) and the ensemble's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.finetune.checkpoint import append_log, save_atomic, side_files, write_training_figure
from pipeline.finetune.cohort import cohort_fields
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.features import Handover
from pipeline.finetune.joined import joined_embedding
from pipeline.finetune.loop import Trainer
from pipeline.finetune.validation import TAR_KEY, all_pairs_metrics

log = logging.getLogger(__name__)

SEED_STEP = 1000
"""Member k trains with seed `seed` + SEED_STEP x k."""


def member_path(out: Path, k: int) -> Path:
    """OUT.pt -> OUT.member<k>.pt."""
    out = Path(out)
    return out.with_name(f"{out.stem}.member{k}{out.suffix}")


def member_configs(cfg: FinetuneConfig) -> list[FinetuneConfig]:
    """The runs of `cfg`'s members (none for a single network): other seeds, the same validation split."""
    if cfg.members == 1:
        return []
    if cfg.layer != "penultimate":
        raise PipelineError(
            "--members joins the members' penultimate embeddings (cosine): it needs --recipe best (the layer "
            f"penultimate), not the layer {cfg.layer}"
        )
    split = cfg.seed if cfg.split_seed is None else cfg.split_seed
    return [
        replace(
            cfg, out=member_path(cfg.out, k), members=1, seed=cfg.seed + SEED_STEP * k, split_seed=split, cohort_top=0
        )
        for k in range(cfg.members)
    ]


def train_ensemble(
    cfg: FinetuneConfig,
    members: list[FinetuneConfig],
    train_one: Callable[[FinetuneConfig, Handover], Path],
    make_trainer: Callable[[FinetuneConfig, Handover], Trainer],
    shared: Handover | None = None,
) -> Path:
    """Train (or resume, or reuse) each member with `train_one`, validate the ensemble on a trainer of member 0
    (`make_trainer`), and write OUT, its log and its training figure. `shared`: what the members hand on (and
    what is left of it at the end)."""
    out = Path(cfg.out)
    shared = shared if shared is not None else Handover()
    paths = [train_one(m, shared) for m in members]
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    states = [c["model"] for c in ckpts]
    trainer = make_trainer(members[0], shared)
    val = ensemble_validation(trainer, states)
    log.info(
        "ensemble of %d: validation AUC %.4f, TAR at FAR 1e-3 %.4f (members: %s)",
        len(states),
        val["val_auc"] if val["val_auc"] is not None else float("nan"),
        val[TAR_KEY] if val[TAR_KEY] is not None else float("nan"),
        ", ".join(f"{max((r.get('val_auc') or 0) for r in c['history']):.4f}" for c in ckpts),
    )
    record = {"epoch": max(c["epoch"] for c in ckpts), "member": "ensemble", **val}
    history = [{**r, "member": k} for k, c in enumerate(ckpts) for r in c["history"]] + [record]
    for path in side_files(out):  # an earlier run's, recognised by check_outputs
        path.unlink(missing_ok=True)
    append_log(side_files(out)[0], record)
    write_training_figure(side_files(out)[2], history, cfg.identity())
    ckpt = {
        "model": states[0],
        "members": states[1:],
        "member_files": [p.name for p in paths],
        "member_best_epochs": [c.get("best_epoch") for c in ckpts],
        "config": cfg.identity(),
        "history": history,
        "epoch": record["epoch"],
        "complete": True,
        "validation_paths": trainer.val_paths,
    }
    if cfg.cohort_top:
        ckpt.update(cohort_fields(trainer, states, cfg.cohort_top))
    save_atomic(ckpt, out)
    log.info("wrote %s (%d members)", out, len(states))
    return out


def ensemble_validation(trainer: Trainer, states: list[dict]) -> dict:
    """{"val_auc", TAR_KEY} of the members' joined embedding (`joined_embedding`) over the trainer's validation
    images."""
    if len(trainer.val_rows) < 2:
        return {"val_auc": None, TAR_KEY: None}
    m = all_pairs_metrics(joined_embedding(trainer, states), trainer.val_labels, "cosine")
    return {"val_auc": None if m is None else m["auc"], TAR_KEY: None if m is None else m["tar_at_far"]}
