"""metrics.json of a scored store, assembled in one place for every path (in memory, torchrun ranks, listed
pairs, `--rows` parts and their `merge`), so that every all-pairs path writes the same keys."""

from __future__ import annotations

from pathlib import Path

from pipeline.metrics.roc import HistogramROC
from pipeline.report.results import describe


def edge_bin_fraction(acc: HistogramROC, n_pairs: int) -> float:
    """Share of the pairs counted in the two edge bins (scores outside the sampled range land there)."""
    return float((acc.pos[[0, -1]].sum() + acc.neg[[0, -1]].sum()) / max(1, n_pairs))


def assemble_metrics(metrics: dict, extra: dict, *, metric: str, score_norm: str | None, bins: int, device: str,
                     seconds: float, mode: str, world_size: int, attrs: dict, store: Path | str, label: str | None,
                     variant: str | None, config: dict) -> dict:  # fmt: skip
    """`metrics` (from `HistogramROC.compute` or the listed pairs, without "roc") completed with how it was
    scored (`extra`: backend, tiles, timings, ...), the store's description and the configuration. `score_norm`:
    what the subtracted score offsets are (the store's `score_norm` attribute), None for plain scores."""
    metrics.update(
        metric=metric,
        score_norm=score_norm,
        bins=bins,
        device=device,
        seconds=seconds,
        pairs_per_second=metrics["n_pairs"] / seconds if seconds > 0 else float("inf"),
        mode=mode,
        **extra,
    )
    metrics["world_size"] = world_size
    if "auc_exact" in metrics:
        metrics["auc_minus_exact"] = metrics["auc"] - metrics["auc_exact"]
    metrics.update(
        **describe(attrs, Path(store), label, variant),
        config={k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
    )
    return metrics
