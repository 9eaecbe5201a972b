"""What the score of a pair is (`ScoreDefinition`): the metric and, for cosine, the store's score offsets
(cohort normalisation: cos - o_i - o_j), built once from the store and the configuration and passed to every
part of scoring, which asks it instead of testing the metric's name.

It knows how rows become tile operands (`augment`: `left_i . right_j` is the pair's value), the provable range
of the values (`bin_range`), a pair's distance in float64 (`pair_distance`, `listed_values`) and which way is
similar (its `metric`, `pipeline.metrics.binning.Metric`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.binning import L2, Metric, as_metric

if TYPE_CHECKING:
    from pipeline.store.layout import Store


@dataclass(frozen=True, eq=False)
class ScoreDefinition:
    """The metric and the score offsets of one scoring run."""

    metric: Metric
    offsets: np.ndarray | None = None
    """Per store row, the score offset subtracted from each of its cosines (float32); None: plain scores."""
    norm: str | None = None
    """What the offsets are (the store's `score_norm` attribute), None for plain scores."""

    def __post_init__(self):
        object.__setattr__(self, "metric", as_metric(self.metric))

    @classmethod
    def of(cls, store: Store, metric: str, score_norm: bool = True) -> ScoreDefinition:
        """The definition for `store`: its score offsets unless `score_norm` is False (offsets with l2 are an
        error that says so)."""
        offsets = store.score_offsets(metric, score_norm)
        return cls(as_metric(metric), offsets, None if offsets is None else store.score_norm)

    @property
    def euclidean(self) -> bool:
        """l2: rows centred (distances unchanged, less cancellation), values squared distances; cosine: rows
        scaled to unit length, values cosines."""
        return self.metric is L2

    def in_order(self, order: np.ndarray | None) -> np.ndarray | None:
        """The offsets of the rows in `order` (positions -> store rows; None: the store's order)."""
        return self.offsets if self.offsets is None or order is None else self.offsets[order]

    @property
    def offset_range(self) -> tuple[float, float] | None:
        """(smallest, largest) score offset, or None."""
        return None if self.offsets is None else (float(self.offsets.min()), float(self.offsets.max()))

    def width(self, d: int) -> int:
        """Columns of the tile operands (`augment`): D+2 for l2 and for cosine with score offsets, D+1 for cosine."""
        return d + 2 if self.euclidean or self.offsets is not None else d + 1

    def augment(self, x: np.ndarray, mean: np.ndarray | None, left: np.ndarray, right: np.ndarray,
                offsets: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """Rows `x` (float32) into `left`/`right` (views of the tile operands, [m, `width`]), so that
        `left_i . right_j` is the value of the pair: l2 `[x-mean, |x-mean|^2, 1]` and `[-2(x-mean), 1,
        |x-mean|^2]` (squared distance); cosine `[x/|x|, 1]` and `[x/|x|, 0]`, or with the rows' score `offsets` o
        (these rows' own) `[x/|x|, -o, 1]` and `[x/|x|, 1, -o]` (cos - o_i - o_j). The last column of `left` is
        always its ones. Returns the per-row float64 squared norms (of the centred rows, l2; of the raw rows,
        cosine). The rows are transformed in place in `left`'s first D columns (`x` may be those columns
        already): no copy, whose fresh memory would cost page faults; the arithmetic is the same for strided
        and contiguous rows, and a row's values do not depend on the rows beside it."""
        d = x.shape[1]
        xc = left[:, :d]
        if not np.may_share_memory(x, xc):
            xc[...] = x  # float16 rows are widened here
        if self.euclidean:
            xc -= mean
            sq = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
            left[:, d], left[:, d + 1] = sq, 1.0
            np.multiply(xc, np.float32(-2.0), out=right[:, :d])
            right[:, d], right[:, d + 1] = 1.0, sq
            return sq
        sq = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
        if (sq > 0).all():
            xc /= np.sqrt(sq)[:, None].astype(np.float32)
        right[:, :d] = xc
        if offsets is None:
            left[:, d], right[:, d] = 1.0, 0.0
        else:
            np.negative(offsets, out=left[:, d])
            left[:, d + 1], right[:, d] = 1.0, 1.0
            np.negative(offsets, out=right[:, d + 1])
        return sq

    def refuse_zero_rows(self, path: Path | str, sq: np.ndarray,
                         store_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> None:  # fmt: skip
        """Cosine: rows whose squared norm `sq` is 0 are an error naming them (`store_rows` maps positions in
        `sq` to store rows; None: the same)."""
        if self.euclidean:
            return
        zero = np.flatnonzero(sq == 0)
        if len(zero):
            rows = sorted((zero if store_rows is None else store_rows(zero)).tolist())
            raise PipelineError(
                f"{path}: {len(zero)} rows are all zeros (rows {rows[:10]}): their cosine is undefined. "
                f"Use --metric l2."
            )

    def max_norm(self, sq: np.ndarray) -> float:
        """The largest norm of the rows multiplied (centred rows, l2; unit rows, cosine) from their `sq`."""
        return float(np.sqrt(sq.max())) if self.euclidean else 1.0

    def bin_range(self, vmin: float, vmax: float, max_norm: float) -> tuple[float, float]:
        """[lo, hi] of the bins: the sample's range widened by 5% each side, inside the provable range (squared
        distances in [0, 4 max_norm^2]; cosines in [-1, 1], with score offsets in [omin, omax]:
        [-1 - 2 omax, 1 - 2 omin])."""
        margin = 0.05 * (vmax - vmin) or 1e-6 * max(1.0, abs(vmax))
        offsets = self.offset_range
        if self.euclidean:
            lo, hi = max(vmin - margin, 0.0), min(vmax + margin, 4.0 * max_norm**2 * (1 + 1e-4) + 1e-30)
        elif offsets is None:
            lo, hi = max(vmin - margin, -1.0 - 1e-4), min(vmax + margin, 1.0 + 1e-4)
        else:
            floor, ceil = -1.0 - 2.0 * offsets[1], 1.0 - 2.0 * offsets[0]
            lo = max(vmin - margin, floor - 1e-4 * max(1.0, abs(floor)))
            hi = min(vmax + margin, ceil + 1e-4 * max(1.0, abs(ceil)))
        if not hi > lo:
            hi = lo + max(1e-6, abs(lo) * 1e-6)
        return float(lo), float(hi)

    def pair_distance(self, store: Store, i: int, j: int) -> float:
        """Distance of store rows i and j in float64: Euclidean, or 1 - value (value = cosine minus the rows'
        score offsets)."""
        a, b = store.rows(i, i + 1)[0].astype(np.float64), store.rows(j, j + 1)[0].astype(np.float64)
        if self.euclidean:
            return float(np.sqrt(((a - b) ** 2).sum()))
        shift = (0.0, 0.0) if self.offsets is None else (self.offsets[i], self.offsets[j])
        return float(1.0 - (a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) - float(shift[0]) - float(shift[1])))

    def listed_values(self, x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """float64 values of the `pairs` (store rows) of the float64 rows `x`: squared distances, or cosines minus
        the rows' score offsets."""
        a, b = x[pairs[:, 0]], x[pairs[:, 1]]
        if self.euclidean:
            return ((a - b) ** 2).sum(1)
        values = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        if self.offsets is not None:
            o = self.offsets.astype(np.float64)
            values -= o[pairs[:, 0]] + o[pairs[:, 1]]
        return values
