"""Score files as results (`score --scores FILE`, `score --pairs --export`), without torch: another system's
scores evaluated exactly as a store's listed pairs are, or as all pairs are beyond memory (`pipeline.scoring.file_metrics`), and the listed pairs'
scores written out (`pipeline.scoring.scorefiles`)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.metrics.intervals import GROUPS
from pipeline.outputs import claim
from pipeline.report.results import RESULT_FILES, check_results_out, write_results
from pipeline.scoring.assemble import assemble_metrics
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.definition import ScoreDefinition
from pipeline.scoring.file_metrics import file_metrics
from pipeline.scoring.scorefiles import read_blocks, write_scores


def export_writers(cfg: ScoreConfig, score: ScoreDefinition) -> dict:
    """scores.bob4 or scores.csv: the listed pairs' scores (similarities: l2 as minus the distance) with each
    image's identity (a same-person pair's two identities written equal, as bob reads them)."""
    from pipeline.scoring.listed import listed_pairs  # here: reading score files needs neither h5py nor stores
    from pipeline.store.layout import open_store

    with open_store(cfg.store) as store:
        values, same, _ = listed_pairs(store, score)
        names, labels, paths = store.strings("identities"), store.labels, store.strings("paths")
        pairs = store.pairs()[0]
    who = [names[k] if k < len(names) else str(k) for k in labels] if names else [str(k) for k in labels]
    a = np.array([who[i] for i in pairs[:, 0]], dtype=object)
    b = np.where(same, a, np.array([who[j] for j in pairs[:, 1]], dtype=object))
    b = np.where(~same & (a == b), b + "#other", b)
    probe = [Path(paths[j]).name if j < len(paths) else str(j) for j in pairs[:, 1]]
    similarity = -score.metric.to_distance(values) if score.euclidean else values
    name = f"scores.{cfg.export}"
    return {name: lambda p: write_scores(p, cfg.export, similarity, same, a, b, probe)}


def score_file(cfg: ScoreConfig) -> dict:
    """Another system's scores (`cfg.scores`, `pipeline.scoring.scorefiles`) as a store's listed pairs: exact
    metrics, intervals, figures; the same results folder. Scores are similarities (higher: more alike), written
    as the cosine's are (thresholds as 1 - score)."""
    out = None if cfg.out is None else Path(cfg.out)
    inputs = [Path(p) for p in (cfg.scores, cfg.impostor_scores) if p is not None]
    if out is None:
        return _score_file(cfg)
    with claim(out, lambda: check_results_out(out, cfg.overwrite, inputs), RESULT_FILES):
        return _score_file(cfg)


def _score_file(cfg: ScoreConfig) -> dict:
    t0 = time.perf_counter()

    def read():
        return read_blocks(cfg.scores, cfg.score_format, cfg.impostor_scores, groups=GROUPS)

    acc, metrics, extra = file_metrics(read, str(cfg.scores), cfg.bins, cfg.seed)
    roc = metrics.pop("roc")
    attrs = {"score_file": str(cfg.scores), "score_format": cfg.score_format, "model": Path(cfg.scores).stem}
    metrics = assemble_metrics(metrics, extra, metric="cosine", score_norm=None, bins=cfg.bins, device="cpu",
                               seconds=time.perf_counter() - t0, mode="scores", world_size=1, attrs=attrs,
                               store=cfg.scores, label=cfg.label, variant=cfg.variant, config=asdict(cfg))  # fmt: skip
    if cfg.out is not None:
        write_results(Path(cfg.out), metrics, roc, acc, log_fpr=cfg.log_fpr)
    return metrics
