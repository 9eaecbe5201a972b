"""The embedding of several members' weights (or one network's) over a trainer's decoded images, as `embed`
computes the joined embedding of an ensemble (`pipeline.nets.split.Ensemble`): for validating an ensemble and for
the cohort a checkpoint keeps."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.finetune.loop import Trainer


@torch.no_grad()
def joined_embedding(
    trainer: Trainer, states: list[dict], rows: np.ndarray | None = None, cpu_bf16: bool = False
) -> torch.Tensor:
    """The embedding of bank rows `rows` (the validation images by default) by the members `states`, as
    `pipeline.nets.split.Ensemble` under `embed` computes it: per orientation the concatenated unit-length
    embeddings of the members, then (test-time flip) the mean of both orientations. One network's (one state) is its own
    embedding, unit length per orientation. `cpu_bf16`: the networks run under bfloat16 autocast on the CPU."""
    rows = torch.as_tensor(trainer.val_rows if rows is None else rows)
    views: list[list[torch.Tensor]] = []  # [member][orientation]
    for state in states:
        trainer.model.load_state_dict(state)
        trainer.cache = None  # the cached features of this member's frozen part (the last member's when the same)
        trainer.prepare_phase(1)
        views.append(trainer.embed_views(rows, cpu_bf16, batch=256 if cpu_bf16 else 64))
    joined = [torch.cat([F.normalize(v[o], dim=1) for v in views], dim=1) for o in range(len(views[0]))]
    return sum(joined) / len(joined)
