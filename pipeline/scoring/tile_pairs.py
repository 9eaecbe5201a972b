"""Which pairs of a tile a pass counts: the rows of a span, the upper triangle of a diagonal tile, the rows
actually multiplied (whole canonical blocks), the same-person pairs found by matching labels, and the group-pair
ids of the jackknife."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.metrics.intervals import GROUPS
from pipeline.scoring.blockmath import Tile, block_spans


def clip_to_span(t: Tile, span: tuple[int, int] | None) -> tuple[int, int]:
    """The tile's rows [a, b) whose pairs belong to `span` (pairs i < j with A <= i < B)."""
    return (t.r0, t.r1) if span is None else (max(t.r0, span[0]), min(t.r1, span[1]))


def multiplied(t: Tile, a: int, b: int, side: int) -> tuple[int, int]:
    """Rows of tile `t` actually multiplied for its rows [a, b): the whole canonical blocks of the tile
    (`block_spans`, counted from its first row) that hold them, so that every entry comes from the same product
    call as in a run over the whole tile (`pipeline.scoring.blockmath.fixed_matmul`)."""
    spans = [(t.r0 + s, t.r0 + e) for s, e in block_spans(t.r1 - t.r0, side)]
    return max(s for s, _ in spans if s <= a), min(e for _, e in spans if e >= b)


def pairs_in(t: Tile, span: tuple[int, int] | None) -> int:
    a, b = clip_to_span(t, span)
    if b <= a:
        return 0
    if not t.diagonal:
        return (b - a) * (t.c1 - t.c0)
    return sum(t.c1 - i - 1 for i in range(a, b))


def ranges(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, width: int) -> np.ndarray:
    """Flat indices `r * width + c` for c in [lo_r, hi_r) of each row r, row by row."""
    lens = np.maximum(hi - lo, 0)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(rows.astype(np.int64) * width + lo - np.cumsum(lens) + lens, lens)
    return first + np.arange(total, dtype=np.int64)


def same_label_flat(labels: np.ndarray, a: int, b: int, t: Tile, a2: int, w: int) -> np.ndarray:
    """Flat indices into tile `t`'s product (rows from a2, width w) of its same-person pairs whose row lies in
    [a, b): the tile's columns sorted by label once, each row's matches found by binary search. Labels may be
    in any order; on a diagonal tile only columns j > i count."""
    cols = labels[t.c0 : t.c1]
    order = np.argsort(cols, kind="stable")
    by_label = cols[order]
    lo = np.searchsorted(by_label, labels[a:b], "left")
    lens = np.searchsorted(by_label, labels[a:b], "right") - lo
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    i = np.repeat(np.arange(a, b, dtype=np.int64), lens)
    j = order[np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)].astype(np.int64) + t.c0
    if t.diagonal:
        keep = j > i
        i, j = i[keep], j[keep]
    return (i - a2) * w + (j - t.c0)


# ---------------------------------------------------------------------------------------------------- the loop


def runs(groups: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of equal values of a sorted array."""
    cuts = [0, *(np.flatnonzero(np.diff(groups)) + 1).tolist(), len(groups)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def pair_ids(flat: np.ndarray, width: int, first_row: int, gr: np.ndarray, gc: np.ndarray) -> np.ndarray:
    """Group-pair ids of the values at block positions `flat` (rows counted from `first_row`)."""
    r = flat // width
    return gr[r - first_row] * GROUPS + gc[flat - r * width]


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """`np.isin` for a small sorted second array, by binary search."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[i] == values


@dataclass(frozen=True)
class TilePart:
    """The part of tile `t` (plan index `k`) a CPU pass counts: product rows [lo, hi) (of the rows multiplied,
    from `a2`); on a diagonal tile a pair (r, c) of the product needs c > r + `below`; the same-person pairs of
    the product, sorted by row (`pos_r`), then column (`pos_c`)."""

    k: int
    t: Tile
    lo: int
    hi: int
    a2: int
    below: int | None
    pos_r: np.ndarray
    pos_c: np.ndarray


@dataclass(frozen=True)
class Block:
    """A block of a tile's product: its first pair's rows (`i0`, `j0`, sorted rows), its `width`, and the
    block rows before the first one counted (`skip`)."""

    i0: int
    j0: int
    width: int
    skip: int

    def pair(self, flat):
        """Sorted rows (i, j) of the values at flat block positions `flat` (an int or an array)."""
        return self.i0 + flat // self.width, self.j0 + flat % self.width


def block_values(v: np.ndarray, r0: int, c0: int, width: int, lo: int, hi: int,
                  below: int | None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """The values of product rows [lo, hi) of block `v` (rows from r0, columns from c0): every column (flat
    positions None), or on a diagonal tile the columns c > r + below (with their flat block positions)."""
    if below is None or c0 > hi - 1 + below:  # every column of these rows
        return v[lo - r0 : hi - r0], None
    rows = np.arange(lo, hi)  # a triangle: columns c > r + below
    flat = ranges(rows - r0, np.maximum(rows + below + 1, c0) - c0, np.full(len(rows), width), width)
    return v.reshape(-1).take(flat), flat
