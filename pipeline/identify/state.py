"""What searching a span of the gallery leaves per probe (`SearchState`), how the states of disjoint spans merge
into the state of their union (exactly: maxima and top scores), and the search.npz of a part folder."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.scoring.search import top_columns


@dataclass
class SearchState:
    """Per probe (the rows of `probe_rows`, in order), scores as similarities. For each trial: the mate's score
    (-inf: not enrolled in this trial, or not in the span) and the `r` best scores of the other enrolled identities
    with the identities' indices (-1: none), best first. Trial-independent: the `r` best distractor scores, best
    first, and the best distractor score in each segment of the distractors (the distractor curve's)."""

    mate: np.ndarray  # [T, Q] float32
    nonmate: np.ndarray  # [T, Q, r] float32
    nonmate_ids: np.ndarray  # [T, Q, r] int32
    distractors: np.ndarray  # [Q, r] float32
    segments: np.ndarray  # [Q, S] float32

    @property
    def r(self) -> int:
        return self.distractors.shape[1]


def enrolled_state(best: np.ndarray, mate_ids: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mate score, r best non-mate scores, their identities) of each probe from its best score per identity
    (`best` [Q, people], changed here) and its mate's identity (-1: none)."""
    q = np.arange(len(best))
    has = mate_ids >= 0
    mate = np.full(len(best), -np.inf, np.float32)
    mate[has] = best[q[has], mate_ids[has]]
    best[q[has], mate_ids[has]] = -np.inf
    ids = np.broadcast_to(np.arange(best.shape[1], dtype=np.int32), best.shape)
    vals, idx = top_columns(best, r, ids)
    idx = np.where(np.isfinite(vals), idx, -1).astype(np.int32)
    return mate, vals, idx


def _unique_identities(vals: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's values with an identity listed twice (its images in two spans) kept once, at its best."""
    order = np.lexsort((vals, ids), axis=1)  # by identity, then value
    v, i = np.take_along_axis(vals, order, axis=1), np.take_along_axis(ids, order, axis=1)
    dup = (i[:, :-1] == i[:, 1:]) & (i[:, :-1] >= 0)  # the lesser of two entries of one identity
    v[:, :-1][dup] = -np.inf
    i[:, :-1][dup] = -1
    return v, i


def merge_states(states: list[SearchState]) -> SearchState:
    """The state of the union of disjoint spans."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    t, q, r = first.nonmate.shape
    vals = np.concatenate([s.nonmate for s in states], axis=2).reshape(t * q, -1)
    ids = np.concatenate([s.nonmate_ids for s in states], axis=2).reshape(t * q, -1)
    kept, kept_ids = _unique_identities(vals, ids)
    vals, ids = top_columns(kept, r, kept_ids)
    return SearchState(
        mate=np.maximum.reduce([s.mate for s in states]),
        nonmate=vals.reshape(t, q, r),
        nonmate_ids=ids.reshape(t, q, r).astype(np.int32),
        distractors=top_columns(np.concatenate([s.distractors for s in states], axis=1), r),
        segments=np.maximum.reduce([s.segments for s in states]),
    )


def save_state(path: Path, state: SearchState, **extra: np.ndarray) -> None:
    """The state and `extra` arrays (the probes' rows, the store's labels) as one .npz."""
    np.savez_compressed(path, **{f.name: getattr(state, f.name) for f in fields(SearchState)}, **extra)


def load_state(path: Path) -> tuple[SearchState, dict[str, np.ndarray]]:
    """(state, the other arrays) of a part's search.npz; unreadable is a PipelineError."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        names = [f.name for f in fields(SearchState)]
        state = SearchState(**{k: arrays.pop(k) for k in names})
    except (OSError, ValueError, KeyError) as e:
        raise PipelineError(f"cannot read {path}: {e}. Search that part again (identify --rows A:B).") from None
    return state, arrays
