"""Validation: which held-out people's images it uses and its measures over all their pairs: the AUC and the
true accept rate at a false accept rate of 1e-3 (the project's ROC code, `pipeline.metrics.roc`, exact)."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.faces import lfw
from pipeline.metrics import roc

VAL_FAR = 1e-3
"""The false accept rate of the validation TAR."""
TAR_KEY = f"val_tar_at_far_{VAL_FAR:g}"
"""The name of the validation TAR in the training history (beside `val_auc`)."""


def unpaired_people(people: lfw.FaceSet, pairs: lfw.FaceSet) -> np.ndarray:
    """Identity indices (into `people`) of the people that appear in no pair of `pairs` (the study)."""
    paired = set(pairs.identities)
    return np.array([i for i, n in enumerate(people.identities) if n not in paired], dtype=np.int64)


def random_people(n_people: int, fraction: float, seed: int) -> np.ndarray:
    """A random `fraction` of `n_people` identity indices (at least 2, at most all but one), sorted."""
    n_val = min(n_people - 1, max(2, round(fraction * n_people))) if fraction > 0 else 0
    return np.sort(np.random.default_rng(seed).permutation(n_people)[:n_val])


def validation_rows(labels: np.ndarray, people: np.ndarray, cap: int, per_person: int, seed: int) -> np.ndarray:
    """Image rows of `people` for validation, at most `cap`, in file order: the people in a random order, at most
    `per_person` random images of each, until `cap` images (`seed` draws both), so that the set looks like
    LFWPeople test (many people, few images each) for every seed. `per_person` 0: the rule of checkpoints made
    before it (people with two or more images first, in file order, no cap per person)."""
    chosen = np.flatnonzero(np.isin(labels, people))
    if per_person == 0:
        counts = np.bincount(labels, minlength=labels.max() + 1 if len(labels) else 0)
        multi = counts[labels[chosen]] >= 2
        return np.sort(np.concatenate([chosen[multi], chosen[~multi]])[:cap])
    rng = np.random.default_rng([seed, 1])  # another stream than `random_people`'s
    place = np.zeros(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    place[people] = rng.permutation(len(people))
    order = chosen[np.lexsort((rng.random(len(chosen)), place[labels[chosen]]))]
    person = place[labels[order]]  # ascending: each person's rows together
    rank = np.arange(len(order)) - np.searchsorted(person, person)  # the row's place among its person's
    return np.sort(order[rank < per_person][:cap])


def all_pairs_metrics(
    emb: torch.Tensor, labels: np.ndarray, metric: str, offsets: torch.Tensor | None = None
) -> dict[str, float] | None:
    """{"auc", "tar_at_far"} over every pair i < j (similarity: cosine, or minus the Euclidean distance; with
    `offsets` o, cosine - o_i - o_j, `pipeline.embedding.cohort`): the AUC (ties one half) and the true accept rate at FAR
    `VAL_FAR`, both exact, from `pipeline.metrics.roc.exact_counts` and `roc_metrics`, as `score` computes them. None when
    undefined (fewer than two images, or no same-person or no different-person pair)."""
    if len(labels) < 2:
        return None
    emb = emb.float()
    if metric == "cosine":
        e = F.normalize(emb, dim=1)
        values = e @ e.T
        if offsets is not None:
            values = values - offsets.float()[:, None] - offsets.float()[None, :]
    else:
        values = torch.cdist(emb, emb)
    return matrix_metrics(values.numpy(), labels, metric)


def matrix_metrics(values: np.ndarray, labels: np.ndarray, metric: str) -> dict[str, float] | None:
    """`all_pairs_metrics` of the pairs i < j of a full score matrix (`metric` says which way is similar)."""
    i, j = np.triu_indices(len(labels), 1)
    same = labels[i] == labels[j]
    if same.all() or not same.any():
        return None
    pos, neg, thr = roc.exact_counts(values[i, j], same, metric)
    m = roc.roc_metrics(pos, neg, thr, float("nan"), exact=True)
    return {"auc": m["auc"], "tar_at_far": m["tar_at_far"][f"{VAL_FAR:g}"]}


def all_pairs_auc(emb: torch.Tensor, labels: np.ndarray, metric: str) -> float | None:
    """The AUC of `all_pairs_metrics` (None when undefined)."""
    m = all_pairs_metrics(emb, labels, metric)
    return None if m is None else m["auc"]
