"""What a binned value is (`Metric`: which way is similar, how it becomes a distance) and the equal-width bins
over it (`Binning`). The lowest layer of the metrics: the ROC, the exact tail and the intervals build on it.

The binned value is what the scoring engine computes cheapest: the squared Euclidean distance for `l2` (small
= similar) and the cosine for `cosine` (large = similar). Bin `k` covers `[lo + k w, lo + (k+1) w)` with
`w = (hi - lo) / bins`; values below `lo` count in the first bin and values above `hi` in the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


class Metric(str):
    """A metric by name ("l2" or "cosine", equal to that string, so it is stored and compared as one) that
    answers every question that depends on which way is similar, so callers never test the name."""

    low_is_similar: bool
    """l2 (squared distances): smaller is more similar; cosine: larger is."""
    identical: float
    """The value of two identical rows: squared distance 0, cosine 1 (the most similar value there is)."""

    def __new__(cls, name: str, low_is_similar: bool, identical: float) -> Metric:
        m = super().__new__(cls, name)
        m.low_is_similar, m.identical = low_is_similar, identical
        return m

    def __reduce__(self):  # pickled (torchrun's collectives, spawned processes) as the shared instance
        return as_metric, (str(self),)

    @property
    def unbounded(self) -> float:
        """The least similar value there is: no bound yet."""
        return math.inf if self.low_is_similar else -math.inf

    def key(self, values: Any) -> Any:
        """`values` as keys that grow as pairs grow less similar (l2: the values; cosine: negated)."""
        return values if self.low_is_similar else -values

    def more_similar(self, a: Any, b: Any) -> Any:
        return a < b if self.low_is_similar else a > b

    def at_least_as_similar(self, a: Any, b: Any) -> Any:
        return a <= b if self.low_is_similar else a >= b

    def least_similar(self, values: Any) -> Any:
        """The least similar of `values` (NumPy arrays and torch tensors alike)."""
        return values.max() if self.low_is_similar else values.min()

    def least_similar_at(self, values: Any) -> Any:
        """Index of the (first) least similar of `values`."""
        return values.argmax() if self.low_is_similar else values.argmin()

    def capped(self, values: np.ndarray, bound: Any) -> np.ndarray:
        """`values` with none more similar than `bound`."""
        return np.maximum(values, bound) if self.low_is_similar else np.minimum(values, bound)

    def most_similar_first(self, counts: np.ndarray) -> np.ndarray:
        """Counts per bin (last axis, in increasing value) from the most similar bin to the least similar."""
        return counts if self.low_is_similar else counts[..., ::-1]

    def to_distance(self, values: np.ndarray) -> np.ndarray:
        """Binned value -> distance in the metric's own unit: sqrt of the squared distance (l2), 1 - cosine."""
        values = np.asarray(values, dtype=np.float64)
        return np.sqrt(np.clip(values, 0.0, None)) if self.low_is_similar else 1.0 - values

    def from_distance(self, distance: float) -> float:
        return distance * distance if self.low_is_similar else 1.0 - distance


L2 = Metric("l2", True, 0.0)
COSINE = Metric("cosine", False, 1.0)
METRICS = {str(m): m for m in (L2, COSINE)}


def as_metric(metric: str) -> Metric:
    """The `Metric` of a name (or of a `Metric`); a ValueError for any other."""
    try:
        return METRICS[str(metric)]
    except KeyError:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, not {metric!r}") from None


def value_to_distance(values: np.ndarray, metric: str) -> np.ndarray:
    """Binned value -> distance in the metric's own unit: sqrt of the squared distance (l2), 1 - cosine."""
    return as_metric(metric).to_distance(values)


def distance_to_value(distance: float, metric: str) -> float:
    return as_metric(metric).from_distance(distance)


@dataclass(frozen=True)
class Binning:
    """Equal-width bins over [lo, hi] of the binned value (values outside count in the edge bins)."""

    lo: float
    hi: float
    bins: int
    metric: Metric
    """The metric (a name is turned into its `Metric`)."""
    near: float = field(default=math.nan, compare=False)
    """The sample's value where the exact tail starts (`pipeline.metrics.tail.start_rank`); not part of the bins."""

    def __post_init__(self):
        object.__setattr__(self, "metric", as_metric(self.metric))
        if self.bins < 2:
            raise ValueError(f"bins must be at least 2, not {self.bins}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"bin range must be finite with hi > lo, not [{self.lo}, {self.hi}]")

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def scale(self) -> float:
        """Bin coordinates per unit of value: `bins / (hi - lo)`."""
        return self.bins / (self.hi - self.lo)

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def coordinate(self, value: float) -> float:
        """The bin coordinate of `value`: bin k holds coordinates [k, k+1)."""
        return (value - self.lo) * self.bins / (self.hi - self.lo)

    def histogram(self, values: torch.Tensor) -> torch.Tensor:
        """Counts per bin (float tensor, exact up to 2^24 per call for float32 input), edges clamped in."""
        import torch  # here: out-of-core scoring and merge use this module without torch

        if values.numel() == 0:
            return torch.zeros(self.bins, dtype=values.dtype, device=values.device)
        mn, mx = torch.aminmax(values)
        if float(mn) < self.lo or float(mx) > self.hi:
            values = values.clamp(self.lo, self.hi)
        return torch.histc(values, bins=self.bins, min=self.lo, max=self.hi)
