"""Rank-1 identification (`score --rank1`): is the nearest other image of the same person?"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.scoring.faiss_blas import import_faiss
from pipeline.scoring.memory import MemoryRows

log = logging.getLogger(__name__)


def rank1_accuracy(rows: MemoryRows, backend: str, block: int) -> dict:
    """Rank-1 identification: for each image whose person has another image, is its nearest other image (all
    other images are the gallery) of the same person? Nearest: the most similar score, so with score offsets the
    largest cos(q, g) - o_g. FAISS exact k-NN when installed, torch otherwise (`left @ right.T`, the scores)."""
    sizes = rows.stats.group_sizes
    queries = np.flatnonzero(np.repeat(sizes, sizes) > 1)
    if len(queries) == 0:
        return {"rank1_accuracy": float("nan"), "rank1_queries": 0}
    nearest = None
    if backend == "faiss":
        try:
            nearest = _nearest_faiss(rows, queries)
        except ImportError:
            log.warning("faiss is not installed: rank-1 by torch")
    if nearest is None:
        nearest = _nearest_torch(rows, queries, block)
    lab = rows.stats.labels
    hit = lab[nearest] == lab[queries]
    return {"rank1_accuracy": float(hit.mean()), "rank1_queries": int(len(queries))}


def _nearest_faiss(rows: MemoryRows, queries: np.ndarray) -> np.ndarray:
    faiss = import_faiss()

    x = np.ascontiguousarray(rows.x)
    q = x[queries]
    if rows.offsets is not None:  # [x_g, -o_g] . [x_q, 1] = cos - o_g: the query's own offset ranks nothing
        x = np.ascontiguousarray(np.c_[x, -rows.offsets])
        q = np.c_[q, np.ones(len(q), dtype=np.float32)]
    index = (faiss.IndexFlatL2 if rows.score.euclidean else faiss.IndexFlatIP)(x.shape[1])
    index.add(x)
    _, nn = index.search(q, 2)
    return np.where(nn[:, 0] == queries, nn[:, 1], nn[:, 0])


def _nearest_torch(rows: MemoryRows, queries: np.ndarray, block: int) -> np.ndarray:
    key = rows.score.metric.key  # minimise the key: the most similar
    out = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), block):
        q = torch.from_numpy(queries[s : s + block]).to(rows.left.device)
        best = torch.full((len(q),), math.inf, device=q.device)
        arg = torch.zeros(len(q), dtype=torch.int64, device=q.device)
        for c0 in range(0, rows.n, block):
            c1 = min(c0 + block, rows.n)
            v = key(rows.left[q] @ rows.right[c0:c1].T)
            own = (q >= c0) & (q < c1)
            v[own.nonzero().squeeze(1), (q[own] - c0)] = math.inf
            m, a = v.min(1)
            better = m < best
            best = torch.where(better, m, best)
            arg = torch.where(better, a + c0, arg)
        out[s : s + len(q)] = arg.cpu().numpy()
    return out
