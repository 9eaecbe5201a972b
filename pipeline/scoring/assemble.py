"""metrics.json and part.json of a scored store, assembled in one place for every path (in memory, torchrun
ranks, listed pairs, `--rows` parts and their `merge`), so that every all-pairs path writes the same keys."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.metrics.binning import Binning
from pipeline.metrics.roc import HistogramROC
from pipeline.report.results import describe, json_attrs

if TYPE_CHECKING:
    from pipeline.scoring.config import ScoreConfig
    from pipeline.scoring.counting import TilePass
    from pipeline.scoring.definition import ScoreDefinition
    from pipeline.store.layout import Store


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


TIMINGS = ("seconds_prepare", "seconds_tiles", "seconds_products", "seconds_counting")
"""The timings of all-pairs scoring beside `seconds`; parts' are added up by `merge` (None where a part has none)."""


def timings(seconds_prepare: float, seconds_tiles: float, res: TilePass) -> dict:
    """The `TIMINGS` of one pass: preparation and tiles (wall clock), and the products' and counting's seconds
    summed over the product threads (`TilePass`; None on a GPU)."""
    return dict(zip(TIMINGS, (seconds_prepare, seconds_tiles, res.seconds_products, res.seconds_counting),
                    strict=True))  # fmt: skip


def summed_timings(parts: list[dict]) -> dict:
    """The parts' `TIMINGS` added up (None where a part lacks one: an older version's)."""
    out = {}
    for k in TIMINGS:
        values = [p.get(k) for p in parts]
        out[k] = None if any(v is None for v in values) else sum(values)
    return out


def all_pairs_fields(acc: HistogramROC, n_pairs: int, pair: list[int], bin_lo: float, bin_hi: float,
                     n_tiles: int | None, backend: str, parts: int, seconds: dict) -> dict:  # fmt: skip
    """The fields every all-pairs result adds to its metrics (`assemble_metrics`'s `extra`): how it was scored,
    the least similar pair (store rows), the bins and the timings (`seconds`: the `TIMINGS`)."""
    return {
        "backend": backend,
        "max_distance_pair": list(pair),
        "bin_lo": bin_lo,
        "bin_hi": bin_hi,
        "n_tiles": n_tiles,
        "edge_bin_fraction": edge_bin_fraction(acc, n_pairs),
        "parts": parts,
        **{k: seconds.get(k) for k in TIMINGS},
    }


def part_info(store: Store, cfg: ScoreConfig, score: ScoreDefinition, binning: Binning, rows: tuple[int, int],
              acc: HistogramROC, n_pairs: int, extreme: tuple, n_tiles: int, leaf: int) -> dict:  # fmt: skip
    """part.json of a `--rows` part: what `merge` checks and adds (its place, bins, settings and store identity,
    its pairs and its extreme pair `(value, tile, i, j)`); the timings are added by the caller."""
    return {
        "rows": list(rows),
        "store": str(Path(cfg.store).resolve()),
        "store_n": store.n,
        "store_dim": store.dim,
        "store_size": os.path.getsize(cfg.store),
        "metric": cfg.metric,
        "score_norm": score.norm,
        "bins": cfg.bins,
        "bin_lo": binning.lo,
        "bin_hi": binning.hi,
        "block": cfg.block,
        "leaf": leaf,
        "seed": cfg.seed,
        "sample_pairs": cfg.sample_pairs,
        "n_pairs": n_pairs,
        "n_positive": acc.n_positive,
        "extreme": list(extreme),
        "max_distance": acc.max_distance,
        "n_tiles": n_tiles,
        "label": cfg.label,
        "variant": cfg.variant,
        "provenance": json_attrs(store.attrs),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }


def full_metrics(info: dict, acc: HistogramROC) -> dict:
    """metrics.json of parts that cover every row (their merged part.json `info`), with the keys `score`
    writes."""
    metrics = acc.compute()
    extra = all_pairs_fields(acc, metrics["n_pairs"], info["extreme"][2:], info["bin_lo"], info["bin_hi"],
                             info.get("n_tiles"), "numpy-out-of-core", info["parts"], info)  # fmt: skip
    # n_tiles None: parts of an older version
    config = dict(
        info.get("config", {}), rows=info["ranges"] if info["parts"] > 1 else info.get("config", {}).get("rows")
    )
    return assemble_metrics(metrics, extra, metric=info["metric"], score_norm=info.get("score_norm"),
                            bins=info["bins"], device="cpu", seconds=info["seconds"], mode="all-pairs", world_size=1,
                            attrs=info.get("provenance", {}), store=info["store"], label=info.get("label"),
                            variant=info.get("variant"), config=config)  # fmt: skip
