"""The `run` stage: the whole study in one command, reusing the steps a previous run finished.

Fine-tune -> embed LFWPairs test and LFWPeople test with the pretrained and the fine-tuned network in one pass
(`pipeline.embedding.shared`: each image once, shared first layers once) -> score each store (listed pairs; all
6.87 M pairs); then `summary.json`, `table.md` (the study's layout), the ROC figures and the training curves.
Layout of OUT:

```
finetune/model.pt (+ model.log, model.best.pt, model.training.png)  the checkpoint, its validation log, figure
embeddings/{pretrained,finetuned}-{pairs,people}.h5  the stores
results/{pretrained,finetuned}-{pairs,people}/       score's results folders (metrics.json, roc.png, det.png, ...)
pairs/roc.png, people/roc.png, roc.png, training.png, table.md, summary.json
```
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import outputs
from pipeline.embedding.embed import EmbedConfig, default_data_root, offsets_as_expected
from pipeline.embedding.shared import embed_together
from pipeline.finetune import FinetuneConfig, finetune, recognise_training_figure, write_training_figure
from pipeline.finetune.config import TTA_RESIZES
from pipeline.nets import models
from pipeline.report.results import read_json
from pipeline.report.tables import TRAINING_FILE, report
from pipeline.scoring.stage import score_store
from pipeline.store.layout import open_store

log = logging.getLogger(__name__)

PROTOCOLS = {"pairs": False, "people": True}
"""LFWPairs test (the listed 1,000 pairs) and LFWPeople test (all pairs): all_pairs flag of each."""
STUDY_TABLE = {
    "AlexNet": {"pairs": (0.7411, 0.8239), "people": (0.7392, 0.7912)},
    "VGG-16": {"pairs": (0.7421, 0.8572), "people": (0.7487, 0.8471)},
}
"""The study's AUCs (pretrained, fine-tuned), original unaligned images."""


@dataclass(frozen=True)
class RunConfig:
    """Options of `run` (see `cli.py run --help`)."""

    out: Path
    """Folder for everything the run writes; rerunning with the same folder reuses finished steps."""
    data_root: Path = field(default_factory=default_data_root)
    """Folder with LFW."""
    image_set: str = "deepfunneled"
    """original | funneled | deepfunneled."""
    model: str = "squeezenet1_0"
    """A backbone of `pipeline.nets.models.BACKBONES`."""
    weights: str = "imagenet"
    """The pretrained weights: imagenet | none | PATH."""
    recipe: str = "study"
    """study | best (fine-tuning recipe; it also sets the embedding layer and the metric)."""
    finetune_options: dict = field(default_factory=dict)
    """Overrides of the recipe's presets (phase1_epochs, phase2_epochs, batch_size, lr, momentum, max_pairs)."""
    seed: int = 0
    """Seed of fine-tuning."""
    device: str = "auto"
    """auto | cpu | cuda."""
    workers: int = 2
    """Image-decoding worker processes."""
    embed_batch_size: int = 64
    """Images per forward pass when embedding."""
    limit: int | None = None
    """Quick runs: embed only the first N test pairs / test images."""
    overwrite: bool = False
    """Redo every step (fine-tuning from scratch) instead of reusing finished ones."""
    tta_resizes: tuple[int, ...] | None = None
    """Test-time scales of the fine-tuned network's stores (`EmbedConfig.tta_resizes`); None: the recipe's
    (`TTA_RESIZES`)."""

    def __post_init__(self):
        if self.model not in models.BACKBONES:
            raise ValueError(f"model must be one of {sorted(models.BACKBONES)}, got {self.model!r}")
        if self.limit is not None and self.limit < 2:
            raise ValueError("limit must be >= 2")
        if self.embed_batch_size < 1:
            raise ValueError("embed_batch_size must be >= 1")

    @property
    def test_resizes(self) -> tuple[int, ...]:
        return TTA_RESIZES[self.recipe] if self.tta_resizes is None else tuple(self.tta_resizes)

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tuning step's configuration (its checkpoint in OUT/finetune/model.pt)."""
        out = Path(self.out) / "finetune" / "model.pt"
        return FinetuneConfig(
            out=out,
            data_root=self.data_root,
            image_set=self.image_set,
            model=self.model,
            weights=self.weights,
            recipe=self.recipe,
            seed=self.seed,
            device=self.device,
            workers=self.workers,
            resume=not self.overwrite,  # a missing checkpoint starts from the beginning
            overwrite=self.overwrite,
            **self.finetune_options,
        ).resolved()


def _store_config(
    cfg: RunConfig, weights: str, layer: str, flip: bool, resizes: tuple[int, ...], protocol: str, out: Path
) -> EmbedConfig:
    """What `embed` would be given for one test store of the run."""
    return EmbedConfig(
        out=out,
        data_root=cfg.data_root,
        image_set=cfg.image_set,
        protocol=protocol,
        split="test",
        model=cfg.model,
        weights=weights,
        layer=layer,
        tta_flip=flip,
        tta_resizes=resizes,
        batch_size=cfg.embed_batch_size,
        workers=cfg.workers,
        device=cfg.device,
        limit=cfg.limit,
        overwrite=True,
        seed=cfg.seed,
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


def _score(
    store: Path, out: Path, all_pairs: bool, metric: str, variant: str, label: str, fresh: bool, device: str
) -> tuple[dict, bool]:
    """Score a store unless its results folder exists for the same store, metric and score offsets; (metrics,
    scored)."""
    if (out / "metrics.json").is_file() and not fresh:
        metrics = read_json(out / "metrics.json", "results file")
        with open_store(store, need_labels=False) as s:
            norm = None if s.offsets is None or metric != "cosine" else s.score_norm
        if metrics.get("metric") == metric and metrics.get("score_norm") == norm:
            log.info("reusing %s", out)
            return metrics, False
    metrics = score_store(
        store, out, all_pairs=all_pairs, metric=metric, variant=variant, label=label, overwrite=True, device=device
    )
    return metrics, True


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
    inputs = [Path(cfg.weights)] if cfg.weights not in ("imagenet", "none") else []

    def check() -> None:  # before anything is created; the figure is replaced at the end only when it is ours
        outputs.check_folder_out(out, inputs=inputs, data_root=cfg.data_root)
        outputs.check_replaceable(out / TRAINING_FILE, True, recognise_training_figure, "training figure")

    with outputs.claim(out, check):
        return _run(cfg, out)


def _run(cfg: RunConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ft_cfg = cfg.finetune_config()
    layer = ft_cfg.layer
    metric = "l2" if layer == "output" else "cosine"
    seconds = _previous_seconds(out / "summary.json") if not cfg.overwrite else {}
    results: dict[str, dict[str, dict]] = {p: {} for p in PROTOCOLS}

    t0, before = time.perf_counter(), _mtime(ft_cfg.out)
    checkpoint = finetune(ft_cfg)
    if _mtime(checkpoint) != before:
        seconds["finetune"] = round(time.perf_counter() - t0, 1)
    # every test store, then: the images both protocols use, and the first layers both networks share, once
    networks = {
        "pretrained": (cfg.weights, False, ()),
        "finetuned": (str(checkpoint), ft_cfg.tta_flip, cfg.test_resizes),
    }
    stores = {
        (v, p): _store_config(cfg, w, layer, flip, resizes, p, out / "embeddings" / f"{v}-{p}.h5")
        for v, (w, flip, resizes) in networks.items()
        for p in PROTOCOLS
    }
    fresh = {k for k, c in stores.items() if not _reusable(cfg, c)}
    if fresh:
        t0 = time.perf_counter()
        embed_together([stores[k] for k in sorted(fresh)], ft_cfg.train_blocks)
        seconds["embed " + ", ".join(f"{v} {p}" for v, p in sorted(fresh))] = round(time.perf_counter() - t0, 1)
    names = {"pretrained": "pretrained", "finetuned": f"fine-tuned ({cfg.recipe})"}
    for (variant, protocol), store_cfg in stores.items():
        t0 = time.perf_counter()
        results[protocol][variant], scored = _score(
            store_cfg.out,
            out / "results" / f"{variant}-{protocol}",
            PROTOCOLS[protocol],
            metric,
            variant,
            f"{cfg.model} {names[variant]}",
            (variant, protocol) in fresh,
            cfg.device,
        )
        if scored:
            seconds[f"score {variant} {protocol}"] = round(time.perf_counter() - t0, 1)

    folders = {p: [out / "results" / f"{v}-{p}" for v in ("pretrained", "finetuned")] for p in PROTOCOLS}
    for protocol, dirs in folders.items():
        report(dirs, out / protocol, overwrite=True, training=False)
    table = report([d for dirs in folders.values() for d in dirs], out, overwrite=True, training=False)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    outputs.check_replaceable(out / TRAINING_FILE, True, recognise_training_figure, "training figure")
    outputs.recover_leftovers(out / TRAINING_FILE, ())  # a killed run's temporary figure
    write_training_figure(out / TRAINING_FILE, ckpt["history"], ckpt["config"], ckpt.get("best_epoch"))
    summary = {
        **{p: {v: results[p][v]["auc"] for v in ("pretrained", "finetuned")} for p in PROTOCOLS},
        "model": cfg.model,
        "weights": cfg.weights,
        "image_set": cfg.image_set,
        "recipe": cfg.recipe,
        "layer": layer,
        "metric": metric,
        "tta_resizes": list(cfg.test_resizes),
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
            m: {p: dict(zip(("pretrained", "finetuned"), v, strict=True)) for p, v in t.items()}
            for m, t in STUDY_TABLE.items()
        },
    }
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
