"""The alternatives `bench score` times against ours, as a user would write them: scikit-learn's exact AUC over
every pair's score, torchmetrics' binned AUROC, FAISS's pairwise distances into a NumPy histogram, and the study's
loop over pairs. Each takes (rows, labels, metric) and returns (AUC, same-person pairs)."""

from __future__ import annotations

import numpy as np
import torch


def materialise(x: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's similarity (float32) and same flag, as a user would build them for scikit-learn."""
    t = torch.from_numpy(x)
    if metric == "cosine":
        t = torch.nn.functional.normalize(t, dim=1)
    lab = torch.from_numpy(labels)
    sims, same = [], []
    cols = torch.arange(len(x))
    for s in range(0, len(x), 1024):
        block = -torch.cdist(t[s : s + 1024], t) if metric == "l2" else t[s : s + 1024] @ t.T
        upper = cols[None, :] > torch.arange(s, s + len(block))[:, None]
        sims.append(block[upper].numpy())
        same.append((lab[s : s + 1024, None] == lab[None, :])[upper].numpy())
    return np.concatenate(sims), np.concatenate(same)


def peer_sklearn(x, labels, metric) -> tuple[float, int]:
    from sklearn.metrics import roc_auc_score

    s, y = materialise(x, labels, metric)
    return float(roc_auc_score(y, s)), int(y.sum())


def peer_torchmetrics(x, labels, metric) -> tuple[float, int]:
    from torchmetrics.classification import BinaryAUROC

    s, y = materialise(x, labels, metric)
    auroc = BinaryAUROC(thresholds=10000)
    # scores into [0, 1] as torchmetrics' binned mode expects probabilities
    s = torch.from_numpy(s).double()
    s = ((s - s.min()) / (s.max() - s.min())).float()
    for a in range(0, len(s), 1 << 16):
        auroc.update(s[a : a + (1 << 16)], torch.from_numpy(y[a : a + (1 << 16)]).long())
    return float(auroc.compute()), int(y.sum())


def peer_faiss_numpy(x, labels, metric) -> tuple[float, int]:
    import faiss

    from pipeline.metrics.roc import Binning, HistogramROC

    pos = np.zeros(65536, np.int64)
    allc = np.zeros(65536, np.int64)
    hi = float(4 * (np.linalg.norm(x - x.mean(0), axis=1).max() ** 2))
    xc = np.ascontiguousarray(x - x.mean(0))
    for s in range(0, len(x), 4096):
        for c in range(s, len(x), 4096):
            v = faiss.pairwise_distances(xc[s : s + 4096], xc[c : c + 4096])
            same = labels[s : s + 4096, None] == labels[None, c : c + 4096]
            if c == s:
                m = np.triu(np.ones_like(same), 1)
                v, same = v[m], same[m]
            allc += np.histogram(v, bins=65536, range=(0, hi))[0]
            pos += np.histogram(v[same], bins=65536, range=(0, hi))[0]
    acc = HistogramROC(Binning(0.0, hi, 65536, "l2"))
    acc.add_counts(allc, pos)
    return acc.compute()["auc"], acc.n_positive


def peer_study_loop(x, labels, metric) -> tuple[float, int]:
    """The study's evaluation: a Python loop over pairs keeping every score in a list, then one exact ROC."""
    from sklearn.metrics import roc_auc_score

    scores, same = [], []
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            scores.append(-float(np.linalg.norm(x[i] - x[j])))
            same.append(labels[i] == labels[j])
    return float(roc_auc_score(same, scores)), int(sum(same))


PEERS = {
    "scikit-learn exact": peer_sklearn,
    "torchmetrics BinaryAUROC(10000)": peer_torchmetrics,
    "FAISS pairwise + numpy histogram": peer_faiss_numpy,
    "study loop": peer_study_loop,
}
