"""The cohort of a fine-tuned model (`FinetuneConfig.cohort_top`, `pipeline.embedding.cohort`): the embedding of its training
images, kept in the final checkpoint, and the validation of the normalised scores it gives."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.embedding.cohort import Cohort
from pipeline.finetune.joined import joined_embedding
from pipeline.finetune.loop import Trainer
from pipeline.finetune.validation import TAR_KEY, all_pairs_metrics
from pipeline.runtime import give_back_freed_memory

log = logging.getLogger(__name__)


def cohort_fields(trainer: Trainer, states: list[dict], top: int) -> dict:
    """The final checkpoint's `cohort` (float16 [M, D] unit rows: the training images embedded by the network, or
    the members `states` joined, as `embed` embeds them), `cohort_top`, and `cohort_validation`: the validation
    AUC and TAR with the scores `embed` and `score` then give (cos - o_i - o_j), o averaging `top` cosines."""
    t0 = time.perf_counter()
    # the freed memory training kept (`keep_freed_memory`) would stay resident beside this pass's batches of
    # activations: the main job's peak came here (issue 28, docs/finetuning.md)
    give_back_freed_memory()
    train_rows = np.arange(trainer.n_train)
    # the cohort is reference data, stored in float16: on the CPU it is computed as the recipe trains (`bf16`)
    cohort = F.normalize(joined_embedding(trainer, states, train_rows, bool(trainer.cfg.bf16)), dim=1).half()
    val: dict = {"val_auc": None, TAR_KEY: None}
    if len(trainer.val_rows) >= 2:
        emb = joined_embedding(trainer, states)
        offsets = Cohort(cohort.float().numpy(), min(top, len(cohort))).offsets(emb.numpy())
        m = all_pairs_metrics(emb, trainer.val_labels, "cosine", torch.from_numpy(offsets))
        if m is not None:
            val = {"val_auc": m["auc"], TAR_KEY: m["tar_at_far"]}
    log.info(
        "cohort of %d training images (top %d) in %.1f s: normalised validation AUC %s, TAR at FAR 1e-3 %s",
        len(cohort),
        top,
        time.perf_counter() - t0,
        *(f"{v:.4f}" if v is not None else "-" for v in val.values()),
    )
    return {"cohort": cohort, "cohort_top": min(top, len(cohort)), "cohort_validation": val}
