"""The exact AUC of every pair by sorting float64 scores (`score --exact`): the check of the histogram AUC."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.metrics.curve import exact_counts, roc_metrics
from pipeline.scoring.blockmath import Tile
from pipeline.scoring.memory import MemoryRows

log = logging.getLogger(__name__)


def check_exact_fits(n_pairs: int) -> None:
    """--exact keeps every score: refuse up front when that cannot fit in the free memory."""
    need = 32 * n_pairs
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * avail:
        raise PipelineError(
            f"--exact needs about {need / 2**30:.1f} GiB for {n_pairs} pairs but {avail / 2**30:.1f} GiB are free; "
            f"drop --exact (the histogram AUC comes with auc_error_bound)"
        )


def exact_all_pairs(rows: MemoryRows, plan: list[Tile]) -> dict:
    """The exact AUC over float64 scores of every pair (cosines minus the rows' score offsets), by sorting
    (memory: about 32 bytes per pair)."""
    x = torch.from_numpy(rows.x).double()
    o = None if rows.offsets is None else torch.from_numpy(rows.offsets).double()
    lab = torch.from_numpy(rows.stats.labels)
    sq = (x * x).sum(1)
    values, positive = [], []
    for t in plan:
        if rows.score.euclidean:
            v = (sq[t.r0 : t.r1, None] + sq[None, t.c0 : t.c1] - 2 * x[t.r0 : t.r1] @ x[t.c0 : t.c1].T).clamp_min(0)
        else:
            v = x[t.r0 : t.r1] @ x[t.c0 : t.c1].T
            if o is not None:
                v = v - o[t.r0 : t.r1, None] - o[None, t.c0 : t.c1]
        same = lab[t.r0 : t.r1, None] == lab[None, t.c0 : t.c1]
        if t.diagonal:
            m = torch.ones_like(same).triu(1)
            v, same = v[m], same[m]
        values.append(v.reshape(-1).numpy())
        positive.append(same.reshape(-1).numpy())
    pos, neg, thr = exact_counts(np.concatenate(values), np.concatenate(positive), rows.score.metric)
    return {"auc_exact": roc_metrics(pos, neg, thr, float("nan"), exact=True)["auc"]}
