"""A brute-force reference for `cli.py identify`, written from the definitions of docs/identification.md alone (no
project code): float64 NumPy, every score of a trial held in memory, so small stores only.

It reads the stores with h5py and the trials from the `split.csv` that `identify` wrote (the same trials), scores
every probe against every gallery identity and computes each figure straight from its definition:

- score: cosine `cos(q, g) - o_q - o_g` (offsets 0 for a store without them, all 0 with `score_norm=False`) or,
  for l2, the squared Euclidean distance; internally every score is a *similarity* (l2: minus the distance), so
  higher is better, and `to_units` turns a similarity back into the metric's units;
- an enrolled person's score is the best over their gallery images (`template="best"`) or the cosine with the
  mean of their unit-length embeddings, minus the mean of those images' offsets (`template="mean"`); each
  distractor row is an identity of its own;
- mate rank `1 + #{non-mate identities with score >= mate score}`; CMC; FNIR at FPIR f with
  `k = floor(f n)` exact (fractions), a mated search accepted iff rank 1 and score strictly above `t_(k+1)`
  (every search when `k >= n`); DIR at FAR f = 1 - FNIR at FPIR f; the distractor curve (first n distractors,
  n = 10^3, 10^4, ... and all); figures per trial, then their plain mean over trials.

float32 scores (the implementation's) can order two scores that are closer than about 1e-6 either way, so each
mated search also says whether it is a *near-tie* (some non-mate within `NEAR` of its mate score, relative, with
a floor of 1 for the scale) and each figure comes with its `slack`: the fraction of mated searches whose outcome
a near-tie (with a non-mate, or with the figure's threshold) could flip. An exact implementation differs from the
reference by at most the slack.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np

FPIRS = ("0.001", "0.01", "0.1")
"""The FPIR levels of `fnir_at_fpir` (the keys of metrics.json)."""
FARS = ("0.01",)
"""The FAR levels of `dir_at_far`."""
NEAR = 1e-5
"""Two scores closer than NEAR * max(1, |a|, |b|) are a near-tie (float32 and float64 may order them apart)."""
ROLES = ("gallery", "mated", "nonmated")


@dataclass
class Store:
    x: np.ndarray
    """[N, D] float64, exactly the stored float32 or float16 values."""
    labels: np.ndarray | None
    """[N] int64 identities, None when the store has no /labels (a distractor store may have none)."""
    offsets: np.ndarray | None
    """[N] score offsets (the stored float32 values, as float64), None when the store has none."""


@dataclass
class Trial:
    gallery: np.ndarray
    mated: np.ndarray
    nonmated: np.ndarray
    """Rows of the store (int64), in the order split.csv lists them."""


@dataclass
class Searches:
    """The searches of one trial: mated probes first, then non-mated, each in split.csv's order."""

    rows: np.ndarray
    mated: np.ndarray
    """bool: a mated search."""
    mate: np.ndarray
    """The mate's similarity (NaN for non-mated searches)."""
    rank: np.ndarray
    """The mate's rank, not capped (0 for non-mated searches)."""
    top: np.ndarray
    """The best non-mate similarity (for a non-mated search: its best candidate)."""
    near: np.ndarray
    """bool: a mated search with a non-mate within NEAR of its mate (its rank may differ in float32)."""


def read_store(path: Path | str) -> Store:
    with h5py.File(path, "r") as f:
        x = f["embeddings"][...].astype(np.float64)
        labels = f["labels"][...].astype(np.int64) if "labels" in f else None
        offsets = f["score_offsets"][...].astype(np.float32).astype(np.float64) if "score_offsets" in f else None
    return Store(x, labels, offsets)


def read_split(path: Path | str) -> dict[int, Trial]:
    """split.csv (header `trial,row,role`) -> {trial: Trial}, in increasing trial order."""
    trials: dict[int, dict[str, list[int]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["trial", "row", "role"], reader.fieldnames
        for line in reader:
            if line["role"] not in ROLES:
                raise ValueError(f"split.csv: role {line['role']!r}")
            trials.setdefault(int(line["trial"]), {r: [] for r in ROLES})[line["role"]].append(int(line["row"]))
    return {t: Trial(*(np.asarray(d[r], dtype=np.int64) for r in ROLES)) for t, d in sorted(trials.items())}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def similarity(p: np.ndarray, g: np.ndarray, metric: str, op: np.ndarray, og: np.ndarray) -> np.ndarray:
    """[len(p), len(g)]: cosine minus both offsets, or minus the squared Euclidean distance (offsets unused)."""
    if metric == "cosine":
        return unit(p) @ unit(g).T - op[:, None] - og[None, :]
    out = np.empty((len(p), len(g)))
    step = max(1, 2**22 // max(1, len(g) * p.shape[1]))
    for i in range(0, len(p), step):
        d = p[i : i + step, None, :] - g[None, :, :]
        out[i : i + step] = -np.einsum("ijk,ijk->ij", d, d)
    return out


def to_units(s: np.ndarray | float, metric: str):
    """A similarity in the metric's units (cosine: itself; l2: the squared distance)."""
    return s if metric == "cosine" else -s


def identity_scores(
    store: Store,
    gallery: np.ndarray,
    probes: np.ndarray,
    distractors: list[Store] = (),
    metric: str = "cosine",
    template: str = "best",
    score_norm: bool = True,
    n_distractors: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """([len(probes), I] similarity of each probe to each identity, [I] the identities' people): the enrolled
    people in increasing label order, then one identity (person -1) per distractor row, the first
    `n_distractors` (all when None) in store order."""
    use = metric == "cosine" and score_norm

    def offsets(s: Store, rows: np.ndarray) -> np.ndarray:
        return s.offsets[rows] if use and s.offsets is not None else np.zeros(len(rows))

    xp, op = store.x[probes], offsets(store, probes)
    people, col = np.unique(store.labels[gallery], return_inverse=True)
    if template == "best":
        order = np.argsort(col, kind="stable")
        s = similarity(xp, store.x[gallery[order]], metric, op, offsets(store, gallery[order]))
        starts = np.r_[0, np.flatnonzero(np.diff(col[order])) + 1]
        enrolled = np.maximum.reduceat(s, starts, axis=1)
    elif template == "mean":
        assert metric == "cosine"
        groups = [gallery[col == j] for j in range(len(people))]
        means = np.stack([unit(store.x[g]).mean(axis=0) for g in groups])
        enrolled = similarity(xp, means, metric, op, np.array([offsets(store, g).mean() for g in groups]))
    else:
        raise ValueError(template)
    blocks, persons = [enrolled], [people]
    left = math.inf if n_distractors is None else n_distractors
    for d in distractors:
        rows = np.arange(int(min(len(d.x), left)))
        left -= len(rows)
        blocks.append(similarity(xp, d.x[rows], metric, op, offsets(d, rows)))
        persons.append(np.full(len(rows), -1))
    return np.concatenate(blocks, axis=1), np.concatenate(persons)


def near(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) < NEAR * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))


def search(store: Store, trial: Trial, distractors: list[Store] = (), **options) -> Searches:
    """Every search of `trial` (options: those of `identity_scores`)."""
    probes = np.concatenate([trial.mated, trial.nonmated])
    scores, persons = identity_scores(store, trial.gallery, probes, distractors, **options)
    mated = np.arange(len(probes)) < len(trial.mated)
    enrolled = set(persons[persons >= 0].tolist())
    assert all(p in enrolled for p in store.labels[trial.mated]), "a mated probe of a person not enrolled"
    assert not any(p in enrolled for p in store.labels[trial.nonmated]), "a non-mated probe of an enrolled person"
    is_mate = mated[:, None] & (persons[None, :] == store.labels[probes][:, None])
    mate = np.where(mated, np.where(is_mate, scores, -np.inf).max(axis=1), np.nan)
    nonmate = np.where(is_mate, -np.inf, scores)
    with np.errstate(invalid="ignore"):
        rank = np.where(mated, 1 + (nonmate >= mate[:, None]).sum(axis=1), 0)
        close = (mated[:, None] & ~is_mate & near(nonmate, mate[:, None])).any(axis=1)
    return Searches(probes, mated, mate, rank, nonmate.max(axis=1), close)


def fpir_k(f: str | float, n: int) -> int:
    """k = floor(f n), exactly (f as written in decimal)."""
    return math.floor(Fraction(str(f)) * n)


def threshold(nonmated_best: np.ndarray, f: str | float) -> float:
    """t_(k+1) of the non-mated searches' best similarities sorted t_1 >= ... >= t_n; -inf when k >= n."""
    t = np.sort(nonmated_best)[::-1]
    k = fpir_k(f, len(t))
    return -math.inf if k >= len(t) else float(t[k])


def fnir(mate: np.ndarray, rank: np.ndarray, t: float) -> float:
    """The fraction of mated searches not (rank 1 and mate strictly above t)."""
    return float(np.mean(~((rank == 1) & (mate > t))))


def trial_figures(s: Searches, max_rank: int = 50, fpirs=FPIRS, fars=FARS) -> dict:
    """cmc, fnir_at_fpir, dir_at_far, fpir_thresholds (similarities), n_mated, n_nonmated, `slack` (per
    figure: the fraction of mated searches a near-tie could flip; `cmc`, and one per FPIR/FAR level) and
    `near_threshold` (per level: the fraction of mated searches whose mate is within NEAR of the threshold)."""
    mate, rank, close = s.mate[s.mated], s.rank[s.mated], s.near[s.mated]
    best = s.top[~s.mated]
    levels = dict.fromkeys([*fpirs, *fars])
    thresholds = {f: threshold(best, f) for f in levels}
    fn = {f: fnir(mate, rank, thresholds[f]) for f in levels}
    at = {f: near(mate, np.full_like(mate, thresholds[f])) for f in levels}
    slack = {"cmc": float(close.mean()), **{f: float((close | at[f]).mean()) for f in levels}}
    return {
        "cmc": [float(np.mean(rank <= k)) for k in range(1, max_rank + 1)],
        "fnir_at_fpir": {f: fn[f] for f in fpirs},
        "dir_at_far": {f: 1.0 - fn[f] for f in fars},
        "fpir_thresholds": thresholds,
        "n_mated": int(s.mated.sum()),
        "n_nonmated": int((~s.mated).sum()),
        "slack": slack,
        "near_threshold": {f: float(at[f].mean()) for f in levels},
    }


def curve_sizes(total: int) -> list[int]:
    """n = 10^3, 10^4, ... below `total`, then `total`."""
    sizes, n = [], 1000
    while n < total:
        sizes.append(n)
        n *= 10
    return [*sizes, total] if total else []


def _mean(values: list):
    """Plain mean over trials of numbers, lists (elementwise) and dicts (per key); equal values stay as they are."""
    first = values[0]
    if all(v == first for v in values[1:]) and not isinstance(first, (dict, list)):
        return first
    if isinstance(first, dict):
        return {k: _mean([v[k] for v in values]) for k in first}
    if isinstance(first, list):
        return [_mean([v[i] for v in values]) for i in range(len(first))]
    return float(np.mean(values))


def reference(
    store: Path | str,
    split: Path | str,
    distractors: list[Path | str] = (),
    metric: str = "cosine",
    template: str = "best",
    score_norm: bool = True,
    max_rank: int = 50,
) -> dict:
    """The figures of `identify` for the trials of `split`: per trial under `trials` (each with its `trial`
    number, `searches` and, with distractors, `distractor_curve`), then averaged over trials at the top level,
    slack included."""
    s = read_store(store)
    ds = [read_store(p) for p in distractors]
    total = sum(len(d.x) for d in ds)
    options = dict(metric=metric, template=template, score_norm=score_norm)
    per = []
    for number, trial in read_split(split).items():
        found = search(s, trial, ds, **options)
        fig = trial_figures(found, max_rank)
        fig["trial"], fig["searches"] = number, found
        if ds:
            fig["distractor_curve"] = []
            for n in curve_sizes(total):
                f = fig if n == total else trial_figures(search(s, trial, ds, n_distractors=n, **options), max_rank)
                fig["distractor_curve"].append(
                    {
                        "distractors": n,
                        "rank1": f["cmc"][0],
                        "fnir_at_fpir_0.01": f["fnir_at_fpir"]["0.01"],
                        "slack": {"rank1": f["slack"]["cmc"], "fnir_at_fpir_0.01": f["slack"]["0.01"]},
                    }
                )
        per.append(fig)
    keys = ["cmc", "fnir_at_fpir", "dir_at_far", "slack", "near_threshold"] + (["distractor_curve"] if ds else [])
    out = {k: _mean([p[k] for p in per]) for k in keys}
    out.update(trials=per, metric=metric, max_rank=max_rank, n_distractors=total)
    return out
