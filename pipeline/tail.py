"""The exact tail of all-pairs scoring: the K most similar different-person pairs and the same-person pairs
at least as similar, kept as the exact values the engine binned, so that TAR at very low FAR is exact, not
limited by the bins or the edge bins.

TAR at FAR f is the largest true-accept rate among thresholds whose false-accept rate is at most f
(scikit-learn's `roc_curve` points): with m = floor(f x negatives) false accepts allowed, the threshold must
reject the (m+1)-th most similar different-person pair and everything tied with it, so TAR = the share of
same-person pairs strictly more similar than it. That needs the m+1 most similar negatives exactly: the tail
holds K of them, so every f with floor(f x negatives) < K is exact (`exact_far`).

K depends only on the store (`tail_size(n_pairs, n_positive)`), so every path (threads, torchrun ranks,
`--rows` parts) keeps the same K and their tails combine exactly: the K most similar of the union of tails
are the K most similar overall. Values are bin coordinates (l2: small = similar; cosine: large = similar).
"""

from __future__ import annotations

import math

import numpy as np

TAIL_MAX = 1 << 20  # at most this many negatives (4 MB per thread): exact down to FAR 1e-2 up to 10^8 pairs
TAIL_FAR = 1e-2  # the tail aims to make every FAR level up to this exact


def tail_size(n_pairs: int, n_positive: int) -> int:
    """K for a store: enough negatives for FAR levels up to `TAIL_FAR`, at most `TAIL_MAX`."""
    n_neg = max(0, n_pairs - n_positive)
    return int(min(TAIL_MAX, max(1, math.floor(TAIL_FAR * n_neg) + 1)))


class Tail:
    """The K most similar negatives (`neg`) and the positives at least as similar as the K-th (`pos`), as
    float32 bin coordinates. Feed it blocks in any order and grouping (`add`), combine tails (`merge`)."""

    def __init__(self, k: int, metric: str):
        self.k, self.metric = k, metric
        self.neg = np.zeros(0, dtype=np.float32)
        self.pos = np.zeros(0, dtype=np.float32)
        self._neg: list[np.ndarray] = []
        self._pos: list[np.ndarray] = []
        self._held = 0
        self.bound = np.float32(np.inf if metric == "l2" else -np.inf)  # the K-th most similar seen so far

    def candidates(self, values: np.ndarray) -> np.ndarray:
        """Mask of `values` at least as similar as the current bound (only these can enter the tail)."""
        return values <= self.bound if self.metric == "l2" else values >= self.bound

    def add(self, neg: np.ndarray, pos: np.ndarray) -> None:
        """Negatives and positives (already filtered by `candidates`, or not: both are fine)."""
        if neg.size:
            self._neg.append(np.array(neg, dtype=np.float32).reshape(-1))
            self._held += neg.size
        if pos.size:
            self._pos.append(np.array(pos, dtype=np.float32).reshape(-1))
        if self._held > 2 * self.k:
            self._shrink()

    def _shrink(self) -> None:
        neg = np.concatenate([self.neg, *self._neg])
        pos = np.concatenate([self.pos, *self._pos])
        self._neg, self._pos = [], []
        if len(neg) > self.k:
            key = neg if self.metric == "l2" else -neg
            neg = neg[np.argpartition(key, self.k - 1)[: self.k]]
        if len(neg) >= self.k:  # a full tail: nothing less similar than its last value can matter
            self.bound = neg.max() if self.metric == "l2" else neg.min()
            pos = pos[self.candidates(pos)]
        self.neg, self.pos, self._held = neg, pos, len(neg)

    def merge(self, other: Tail) -> Tail:
        if other.k != self.k or other.metric != self.metric:
            raise ValueError(f"cannot merge tails of K {other.k} ({other.metric}) and {self.k} ({self.metric})")
        other.finish()
        self.add(other.neg, other.pos)
        return self

    def finish(self) -> Tail:
        """Shrink to the final K (sorted, most similar first), so that every path stores the same arrays."""
        self._shrink()
        order = 1 if self.metric == "l2" else -1
        self.neg = np.sort(self.neg)[::order].copy()
        self.pos = np.sort(self.pos)[::order].copy()
        return self

    def tar_at(self, far: float, n_negative: int, n_positive: int) -> float | None:
        """Exact TAR at FAR `far`, or None when the tail does not reach it (then the bins answer)."""
        m = math.floor(far * n_negative + 1e-9)
        if m >= len(self.neg) or n_positive == 0:
            return None if len(self.neg) < n_negative else 1.0  # every negative held: all accepted
        edge = self.neg[m]  # the (m+1)-th most similar negative: rejected, with all tied to it
        above = np.count_nonzero(self.pos < edge) if self.metric == "l2" else np.count_nonzero(self.pos > edge)
        return above / n_positive

    def exact_far(self, n_negative: int) -> float:
        """FAR levels up to this are exact (every negative held: all of them)."""
        return 1.0 if len(self.neg) >= n_negative else len(self.neg) / max(1, n_negative)
