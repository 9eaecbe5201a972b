"""The `run` stage: the whole study in one command, reusing the steps a previous run finished.

Fine-tune -> embed LFWPairs test and LFWPeople test with the pretrained and the fine-tuned network in one pass
(`pipeline.embedding.shared`: each image once, shared first layers once) -> score each store (listed pairs; all
6.87 M pairs); then `summary.json`, `table.md` (the study's layout), the ROC figures and the training curves.
Layout of OUT:

```
finetune/model.pt (+ model.log, model.best.pt, model.training.png)  the checkpoint, its validation log, figure
finetune/model.validation/ (+ model.validation.h5)  the kept network's validation results folder and store
embeddings/{pretrained,finetuned}-{pairs,people}.h5  the stores
results/{pretrained,finetuned}-{pairs,people}/       score's results folders (metrics.json, roc.png, det.png, ...)
pairs/roc.png, people/roc.png, roc.png, training.png, table.md, summary.json
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipeline import outputs
from pipeline.embedding.embed import EmbedConfig, offsets_as_expected
from pipeline.embedding.shared import embed_together
from pipeline.finetune import FinetuneConfig, finetune, recognise_training_figure, write_training_figure
from pipeline.finetune.recipes import RECIPES
from pipeline.nets import models
from pipeline.report.results import read_json
from pipeline.report.tables import TRAINING_FILE, report
from pipeline.runtime import give_back_freed_memory, log_memory
from pipeline.scoring.stage import score_store
from pipeline.store.layout import open_store

log = logging.getLogger(__name__)

PROTOCOLS = {"pairs": False, "people": True}
"""LFWPairs test (the listed 1,000 pairs) and LFWPeople test (all pairs): all_pairs flag of each."""
VARIANTS = ("pretrained", "finetuned")
"""The networks each protocol's stores are embedded with: the starting weights and the fine-tuned ones."""
STUDY_TABLE = {
    "AlexNet": {"pairs": (0.7411, 0.8239), "people": (0.7392, 0.7912)},
    "VGG-16": {"pairs": (0.7421, 0.8572), "people": (0.7487, 0.8471)},
}
"""The study's AUCs (pretrained, fine-tuned), original unaligned images."""

SET_BY_RUN = frozenset({"out", "resume", "overwrite"})
"""`FinetuneConfig` fields that `run` sets (from its own `out` and `overwrite`)."""


@dataclass(frozen=True)
class RunConfig:
    """Options of `run` (see `cli.py run --help`): the fine-tuning step's, whose data, network, recipe and seed
    are the test stores' too, and those of the test stores."""

    out: Path
    """Folder for everything the run writes; rerunning with the same folder reuses finished steps."""
    finetune: Mapping[str, Any] = field(default_factory=dict)
    """Fields of `FinetuneConfig` (data_root, image_set, model, weights, recipe, seed, device, workers, and the
    recipe's values: unset ones take its preset) but `SET_BY_RUN`."""
    embed_batch_size: int = 16
    """Images per forward pass when embedding."""
    limit: int | None = None
    """Quick runs: embed only the first N test pairs / test images."""
    overwrite: bool = False
    """Redo every step (fine-tuning from scratch) instead of reusing finished ones."""
    tta_resizes: tuple[int, ...] | None = None
    """Test-time scales of the fine-tuned network's stores (`EmbedConfig.tta_resizes`); None: the recipe's
    (`Recipe.tta_resizes`)."""

    def __post_init__(self):
        taken = sorted(SET_BY_RUN & set(self.finetune))
        if taken:
            raise ValueError(f"run sets the fine-tuning step's {', '.join(taken)} itself: leave them out")
        unknown = sorted(set(self.finetune) - {f.name for f in fields(FinetuneConfig)})
        if unknown:
            raise ValueError(f"no fine-tuning option {', '.join(unknown)} (see FinetuneConfig)")
        if self.limit is not None and self.limit < 2:
            raise ValueError("limit must be >= 2")
        if self.embed_batch_size < 1:
            raise ValueError("embed_batch_size must be >= 1")
        self.finetune_config()  # checks the fine-tuning fields

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tuning step's configuration (its checkpoint in OUT/finetune/model.pt), the recipe's preset
        filled in."""
        out = Path(self.out) / "finetune" / "model.pt"
        # a missing checkpoint starts from the beginning
        return FinetuneConfig(out=out, resume=not self.overwrite, overwrite=self.overwrite, **self.finetune).resolved()

    def test_resizes(self) -> tuple[int, ...]:
        """The test-time scales of the fine-tuned network's stores."""
        if self.tta_resizes is None:
            return RECIPES[self.finetune_config().recipe].tta_resizes
        return tuple(self.tta_resizes)


def _store_config(
    cfg: RunConfig, t: FinetuneConfig, network: tuple[str, bool, tuple[int, ...]], protocol: str, out: Path
) -> EmbedConfig:
    """What `embed` would be given for one test store of the run: `network` is (weights, tta_flip, tta_resizes)."""
    weights, flip, resizes = network
    return EmbedConfig(
        out=out,
        data_root=t.data_root,
        image_set=t.image_set,
        protocol=protocol,
        split="test",
        model=t.model,
        weights=weights,
        layer=t.layer,
        tta_flip=flip,
        tta_resizes=resizes,
        batch_size=cfg.embed_batch_size,
        workers=t.workers,
        device=t.device,
        limit=cfg.limit,
        overwrite=True,
        seed=t.seed,
    )


def _reusable(cfg: RunConfig, store_cfg: EmbedConfig) -> bool:
    """A complete store made from the same weights file, layer, test-time flip and resizes, and limit."""
    out = Path(store_cfg.out)
    if cfg.overwrite or not out.exists():
        return False
    with open_store(out, need_labels=False) as store:
        a = store.attrs
        same = a.get("weights_sha256", "") == models.weights_provenance(store_cfg.weights)["weights_sha256"]
        same = same and a.get("layer") == store_cfg.layer and int(a.get("limit", 0)) == (cfg.limit or 0)
        same = same and bool(a.get("tta_flip", False)) == store_cfg.tta_flip
        same = same and a.get("transform") == store_cfg.preprocess.describe(store_cfg.model)
    same = same and offsets_as_expected(out, store_cfg)
    log.info("reusing %s" if same else "%s was made from other weights or options: embedding again", out)
    return same


def _previous_seconds(summary: Path) -> dict[str, float]:
    """Step times of an earlier run into the same folder (kept for the steps this run reuses)."""
    try:
        return dict(json.loads(summary.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _mtime(path: Path) -> int | None:
    return Path(path).stat().st_mtime_ns if Path(path).exists() else None


def recognise_summary(path: Path) -> str | None:
    """None when `path` is a summary.json that `run` wrote; else what it is."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "it is not a JSON file"
    ours = isinstance(summary, dict) and {"pairs", "people", "recipe"} <= set(summary)
    return None if ours else "it is not a summary written by run"


def run(cfg: RunConfig) -> dict:
    """The whole study for one model and recipe; returns (and writes) summary.json's dict. Every step reuses
    or replaces only what this tool wrote (each checks its own output) and refuses anything else."""
    out = Path(cfg.out)
    t = cfg.finetune_config()
    inputs = [Path(t.weights)] if t.weights not in ("imagenet", "none") else []

    def check() -> None:  # before anything is created; the figure is replaced at the end only when it is ours
        outputs.check_folder_out(out, inputs=inputs, data_root=t.data_root)
        outputs.check_replaceable(out / TRAINING_FILE, True, recognise_training_figure, "training figure")

    with outputs.claim(out, check):
        return _run(cfg, t, out)


def _run(cfg: RunConfig, t: FinetuneConfig, out: Path) -> dict:
    """The steps: fine-tune, embed the test stores, score them, report; the time of each step this run did in
    `seconds` (the reused steps keep an earlier run's)."""
    out.mkdir(parents=True, exist_ok=True)
    seconds = _previous_seconds(out / "summary.json") if not cfg.overwrite else {}
    t0, before = time.perf_counter(), _mtime(t.out)
    checkpoint = finetune(t)
    if _mtime(checkpoint) != before:
        seconds["finetune"] = round(time.perf_counter() - t0, 1)
    memory = {"finetune": log_memory("fine-tuning")}  # peaks so far, MiB (`cli.py bench memory`)
    give_back_freed_memory()  # fine-tuning's transient memory, before the embedding's own
    stores = _test_stores(cfg, t, checkpoint, out)
    fresh = _embed(cfg, stores, t.train_blocks, seconds)
    memory["embed"] = log_memory("embedding the test stores")
    results = _score_all(t, stores, fresh, out, seconds)
    memory["score"] = log_memory("scoring")
    table, ckpt = _report(out, checkpoint)
    summary = {**_summary(cfg, t, results, checkpoint, ckpt, seconds), "peak_rss_mib": memory}
    outputs.check_replaceable(out / "summary.json", True, recognise_summary, "summary")
    outputs.replace_file(lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"), out / "summary.json")
    log.info(
        "LFWPairs test AUC %.4f -> %.4f; LFWPeople test AUC %.4f -> %.4f (%s)",
        summary["pairs"]["pretrained"],
        summary["pairs"]["finetuned"],
        summary["people"]["pretrained"],
        summary["people"]["finetuned"],
        out / "table.md",
    )
    log.info("\n%s", table)
    return summary


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """The step's time into `seconds[name]` (0.1 s), when it finishes."""
    t0 = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - t0, 1)


def _test_stores(cfg: RunConfig, t: FinetuneConfig, checkpoint: Path, out: Path) -> dict[tuple[str, str], EmbedConfig]:
    """The four test stores: (variant, protocol) -> what `embed` would be given."""
    networks = {
        "pretrained": (t.weights, False, ()),
        "finetuned": (str(checkpoint), t.tta_flip, cfg.test_resizes()),
    }
    return {
        (v, p): _store_config(cfg, t, network, p, out / "embeddings" / f"{v}-{p}.h5")
        for v, network in networks.items()
        for p in PROTOCOLS
    }


def _embed(
    cfg: RunConfig, stores: dict[tuple[str, str], EmbedConfig], blocks: int | None, seconds: dict
) -> set[tuple[str, str]]:
    """Embed the stores that cannot be reused, in one pass: the images both protocols use, and the first layers
    both networks share, once. Returns their keys."""
    fresh = {k for k, c in stores.items() if not _reusable(cfg, c)}
    if fresh:
        with _timed(seconds, "embed " + ", ".join(f"{v} {p}" for v, p in sorted(fresh))):
            embed_together([stores[k] for k in sorted(fresh)], blocks)
    return fresh


def _score_all(
    t: FinetuneConfig, stores: dict[tuple[str, str], EmbedConfig], fresh: set, out: Path, seconds: dict
) -> dict[str, dict[str, dict]]:
    """Score every store into OUT/results/VARIANT-PROTOCOL, reusing the results folder of a store embedded
    before: protocol -> variant -> metrics."""
    metric = "l2" if t.layer == "output" else "cosine"
    names = {"pretrained": "pretrained", "finetuned": f"fine-tuned ({t.recipe})"}
    results: dict[str, dict[str, dict]] = {p: {} for p in PROTOCOLS}
    for (variant, protocol), store_cfg in stores.items():
        folder = out / "results" / f"{variant}-{protocol}"
        metrics = None if (variant, protocol) in fresh else _reusable_result(store_cfg.out, folder, metric)
        if metrics is None:
            with _timed(seconds, f"score {variant} {protocol}"):
                metrics = score_store(
                    store_cfg.out,
                    folder,
                    all_pairs=PROTOCOLS[protocol],
                    metric=metric,
                    variant=variant,
                    label=f"{t.model} {names[variant]}",
                    overwrite=True,
                    device=t.device,
                )
        results[protocol][variant] = metrics
    return results


def _reusable_result(store: Path, folder: Path, metric: str) -> dict | None:
    """The metrics of a results folder scored before from `store` with the same metric and score offsets."""
    if not (folder / "metrics.json").is_file():
        return None
    metrics = read_json(folder / "metrics.json", "results file")
    with open_store(store, need_labels=False) as s:
        norm = None if s.offsets is None or metric != "cosine" else s.score_norm
    if metrics.get("metric") != metric or metrics.get("score_norm") != norm:
        return None
    log.info("reusing %s", folder)
    return metrics


def _report(out: Path, checkpoint: Path) -> tuple[str, dict]:
    """Each protocol's table and figure, the study's table (returned) and figure, and the training curves of the
    checkpoint (returned, read)."""
    folders = {p: [out / "results" / f"{v}-{p}" for v in VARIANTS] for p in PROTOCOLS}
    for protocol, dirs in folders.items():
        report(dirs, out / protocol, overwrite=True, training=False)
    table = report([d for dirs in folders.values() for d in dirs], out, overwrite=True, training=False)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    outputs.check_replaceable(out / TRAINING_FILE, True, recognise_training_figure, "training figure")
    outputs.recover_leftovers(out / TRAINING_FILE, ())  # a killed run's temporary figure
    write_training_figure(out / TRAINING_FILE, ckpt["history"], ckpt["config"], ckpt.get("best_epoch"))
    return table, ckpt


def _summary(cfg: RunConfig, t: FinetuneConfig, results: dict, checkpoint: Path, ckpt: dict, seconds: dict) -> dict:
    """summary.json: the four AUCs, what made them, the fine-tuning's record, the step times and the study's
    AUCs."""
    return {
        **{p: {v: results[p][v]["auc"] for v in VARIANTS} for p in PROTOCOLS},
        "model": t.model,
        "weights": t.weights,
        "image_set": t.image_set,
        "recipe": t.recipe,
        "layer": t.layer,
        "metric": "l2" if t.layer == "output" else "cosine",
        "tta_resizes": list(cfg.test_resizes()),
        "limit": cfg.limit,
        "checkpoint": str(checkpoint),
        "finetune": {
            "config": ckpt["config"],
            "best_epoch": ckpt.get("best_epoch"),
            "member_best_epochs": ckpt.get("member_best_epochs"),
            "cohort_top": ckpt.get("cohort_top"),
            "cohort_validation": ckpt.get("cohort_validation"),
            "history": ckpt["history"],
        },
        "seconds": seconds,
        "study_original_images": {
            m: {p: dict(zip(VARIANTS, aucs, strict=True)) for p, aucs in table.items()}
            for m, table in STUDY_TABLE.items()
        },
    }
