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
from collections.abc import Callable

import numpy as np

from pipeline.metrics.binning import Binning, Metric, as_metric

TAIL_MAX = 1 << 20  # at most this many negatives (4 MB per thread): FAR up to 1e-3 exact below 5 x 10^8 pairs
TAIL_FAR = 2e-3  # the tail aims to make every FAR level up to 1e-3 exact, in every jackknife replicate too


def start_rank(k: int, n_pairs: int, sample_pairs: int) -> int:
    """Rank, in the bin-range sample, of the value the tail starts from: the sample's share of 3 K pairs, so
    that about 3 K pairs of the whole pass the tail's first bound (the tail needs K; were fewer to pass, it would
    hold all that did and be exact to a lower FAR, which `exact_far` says)."""
    return int(math.ceil(3 * k / max(1, n_pairs) * sample_pairs)) + 10


def start_bound(binning: Binning) -> float:
    """The tail's first bound, in bin coordinates, from the sample's value `binning.near` (no bound when
    unknown)."""
    if not math.isfinite(binning.near):
        return binning.metric.unbounded
    return float(np.float32(binning.coordinate(binning.near)))


def tail_size(n_pairs: int, n_positive: int) -> int:
    """K for a store: enough negatives for FAR levels up to `TAIL_FAR`, at most `TAIL_MAX`."""
    n_neg = max(0, n_pairs - n_positive)
    return int(min(TAIL_MAX, max(1, math.floor(TAIL_FAR * n_neg) + 1)))


def _key(values: np.ndarray, ids: np.ndarray, metric: Metric) -> np.ndarray:
    """uint64 keys ordering (value, id) most similar first: the float32 bits made order-preserving, then the id."""
    v = np.asarray(values, dtype=np.float32)
    u = metric.key(v).view(np.uint32).astype(np.uint64)
    u = np.where(u & 0x80000000, ~u & 0xFFFFFFFF, u | 0x80000000)
    return (u << np.uint64(16)) | ids.astype(np.uint16).astype(np.uint64)


class Tail:
    """The K most similar negatives (`neg`) and the positives at least as similar as the K-th (`pos`), as
    float32 bin coordinates, each with the id of its pair of identity groups (`neg_ids`, `pos_ids`, for the
    jackknife of `pipeline.metrics.intervals`). Feed it blocks in any order and grouping (`add`), combine tails (`merge`)."""

    def __init__(self, k: int, metric: str, bound: float | None = None):
        self.k, self.metric = k, as_metric(metric)
        self.neg, self.pos = np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        self.neg_ids, self.pos_ids = np.zeros(0, dtype=np.int16), np.zeros(0, dtype=np.int16)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._held = 0
        # the K-th most similar seen so far; at first the sample's estimate of a value about 3 K pairs pass
        self.bound = np.float32(self.metric.unbounded if bound is None else bound)

    def candidates(self, values: np.ndarray) -> np.ndarray:
        """Mask of `values` at least as similar as the current bound (only these can enter the tail)."""
        return self.metric.at_least_as_similar(values, self.bound)

    def add(self, neg: np.ndarray, pos: np.ndarray, neg_ids: np.ndarray | None = None,
            pos_ids: np.ndarray | None = None) -> None:  # fmt: skip
        """Negatives and positives with their group-pair ids (already filtered by `candidates`, or not)."""
        if not (neg.size or pos.size):
            return
        ids = [np.zeros(len(v), dtype=np.int16) if i is None else np.asarray(i, dtype=np.int16).reshape(-1)
               for v, i in ((neg, neg_ids), (pos, pos_ids))]  # fmt: skip
        self._parts.append((np.array(neg, dtype=np.float32).reshape(-1), ids[0],
                            np.array(pos, dtype=np.float32).reshape(-1), ids[1]))  # fmt: skip
        self._held += neg.size
        if self._held > 2 * self.k:
            self._shrink()

    def _shrink(self) -> None:
        neg = np.concatenate([self.neg, *(p[0] for p in self._parts)])
        neg_ids = np.concatenate([self.neg_ids, *(p[1] for p in self._parts)])
        pos = np.concatenate([self.pos, *(p[2] for p in self._parts)])
        pos_ids = np.concatenate([self.pos_ids, *(p[3] for p in self._parts)])
        self._parts = []
        if len(neg) > self.k:
            keep = self._k_most_similar(neg, neg_ids)
            neg, neg_ids = neg[keep], neg_ids[keep]
        if len(neg) >= self.k:  # a full tail: nothing less similar than its last value can matter
            self.bound = self.metric.least_similar(neg)
            keep = self.candidates(pos)
            pos, pos_ids = pos[keep], pos_ids[keep]
        self.neg, self.neg_ids, self.pos, self.pos_ids, self._held = neg, neg_ids, pos, pos_ids, len(neg)

    def _k_most_similar(self, neg: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Indices of the K most similar values; ties at the K-th value go by id (then position), so every path
        keeps the same pairs."""
        key = self.metric.key(neg)
        edge = np.partition(key, self.k - 1)[self.k - 1]
        inside = np.flatnonzero(key < edge)
        tied = np.flatnonzero(key == edge)
        tied = tied[np.argsort(ids[tied], kind="stable")][: self.k - len(inside)]
        return np.concatenate([inside, tied])

    def merge(self, other: Tail) -> Tail:
        if other.k != self.k or other.metric != self.metric:
            raise ValueError(f"cannot merge tails of K {other.k} ({other.metric}) and {self.k} ({self.metric})")
        other._shrink()
        self.add(other.neg, other.pos, other.neg_ids, other.pos_ids)
        return self

    def finish(self) -> Tail:
        """Shrink to the final K, sorted most similar first (ties by id), so every path stores the same arrays."""
        self._shrink()
        o = np.argsort(_key(self.neg, self.neg_ids, self.metric), kind="stable")
        self.neg, self.neg_ids = self.neg[o], self.neg_ids[o]
        o = np.argsort(_key(self.pos, self.pos_ids, self.metric), kind="stable")
        self.pos, self.pos_ids = self.pos[o], self.pos_ids[o]
        return self

    def tar_without(self, levels: list[float], keep_ids: np.ndarray, n_negative: int, n_positive: int,
                    complete: bool) -> list[float | None]:  # fmt: skip
        """`tar_at` for each level over only the pairs whose group pair `keep_ids` marks (a jackknife replicate;
        the tail is sorted by `finish`)."""
        neg_at = np.flatnonzero(keep_ids[self.neg_ids])
        pos_cum = np.r_[0, np.cumsum(keep_ids[self.pos_ids])]
        out: list[float | None] = []
        for far in levels:
            m = math.floor(far * n_negative + 1e-9)
            if n_positive == 0 or m >= len(neg_at):
                out.append(1.0 if complete and n_positive else None)
                continue
            edge = self.neg[neg_at[m]]
            j = np.searchsorted(self.metric.key(self.pos), self.metric.key(edge))
            out.append(int(pos_cum[j]) / n_positive)  # positives strictly more similar than the edge
        return out

    def tar_at(self, far: float, n_negative: int, n_positive: int, complete: bool | None = None) -> float | None:
        """Exact TAR at FAR `far`, or None when the tail does not reach it (then the bins answer). `complete`:
        the tail holds every negative (default: it holds `n_negative` of them)."""
        complete = len(self.neg) >= n_negative if complete is None else complete
        m = math.floor(far * n_negative + 1e-9)
        if n_positive == 0:
            return None
        if m >= len(self.neg):
            return 1.0 if complete else None  # every negative held: all of them accepted
        edge = self.neg[m]  # the (m+1)-th most similar negative: rejected, with all tied to it
        above = np.count_nonzero(self.metric.more_similar(self.pos, edge))
        return above / n_positive

    def exact_far(self, n_negative: int) -> float:
        """FAR levels up to this are exact (every negative held: all of them)."""
        return 1.0 if len(self.neg) >= n_negative else len(self.neg) / max(1, n_negative)


def duplicate_ids(sq: np.ndarray, row: Callable[[int], np.ndarray]) -> np.ndarray | None:
    """Per row, the id of its class of identical rows (the first row of the class), -1 for a row with no twin;
    None when no two rows are identical. Candidates share their squared norm (`sq`, float64, computed anyway);
    `row(i)` reads row i to confirm."""
    order = np.argsort(sq, kind="stable")
    s = sq[order]
    same = np.flatnonzero(s[1:] == s[:-1])
    if not len(same):
        return None
    ids = np.full(len(sq), -1, dtype=np.int64)
    starts = same[np.r_[True, np.diff(same) > 1]]  # runs of equal norms
    for a in starts:
        b = a + 1
        while b + 1 < len(s) and s[b + 1] == s[a]:
            b += 1
        members = order[a : b + 1]
        rows = {int(i): row(int(i)) for i in members}
        for i in sorted(rows):
            if ids[i] >= 0:
                continue
            twins = [j for j in sorted(rows) if j > i and ids[j] < 0 and np.array_equal(rows[i], rows[j])]
            if twins:
                ids[[i, *twins]] = i
    return ids if (ids >= 0).any() else None


class ExactTies:
    """Pairs the products put at float32 noise where the truth is a tie: identical rows (distance exactly 0,
    cosine exactly 1) get exactly the value of distance 0, and nothing is more similar than that (l2: no
    squared distance below 0; cosine: none above 1). With score offsets o (`offsets`, per sorted row, and
    `scale` = bins / (hi - lo)) the most similar value of a pair is 1 - o_i - o_j: the bound, and the value of
    identical rows, is that pair's. Applied to the tail's values only (the bins see the products' values), so TAR
    at low FAR treats duplicate images as the exact ties they are."""

    def __init__(self, dups: np.ndarray | None, zero: float, metric: Metric, offsets: np.ndarray | None = None,
                 scale: float = 0.0):  # fmt: skip
        self.dups, self.zero, self.metric = dups, np.float32(zero), metric
        self.zero64, self.scale = float(zero), float(scale)
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.float64)

    def bound(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | np.float32:
        """The bin coordinate of the most similar value pairs (rows, cols) can have (float32)."""
        if self.offsets is None:
            return self.zero
        return (self.zero64 - self.scale * (self.offsets[rows] + self.offsets[cols])).astype(np.float32)

    def __call__(self, values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        bound = self.bound(rows, cols)
        v = self.metric.capped(values, bound)
        if self.dups is not None and len(v):
            d = self.dups[rows]
            twins = (d >= 0) & (d == self.dups[cols])
            v[twins] = bound if self.offsets is None else bound[twins]
        return v


def exact_ties(binning: Binning, dups: np.ndarray | None = None, offsets: np.ndarray | None = None) -> ExactTies:
    """`ExactTies` for `binning`, the duplicate ids of the (sorted) rows and their score offsets: the most
    similar possible pair (squared distance 0, cosine 1) at its bin coordinate."""
    b = binning
    return ExactTies(dups, b.coordinate(b.metric.identical), b.metric, offsets, b.scale)
