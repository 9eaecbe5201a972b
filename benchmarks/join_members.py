"""Validation of an ensemble made of finished `finetune` checkpoints (best recipe, one validation split): each
checkpoint's own validation AUC and TAR at FAR 1e-3 and those of the first 2, 3, ... joined as `finetune
--members` joins them (`pipeline.finetune.ensemble.ensemble_validation`). It measures what an ensemble would give
before training one, from runs already made (ablation rows with `--seed S --set split_seed=0`):

    python cli.py bench join-members --data-root ../shared/data runs/ablation/a.best.pt runs/ablation/b.best.pt

The test splits are never looked at."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch


@click.command("join-members")
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def command(data_root: Path, checkpoints: tuple[Path, ...]) -> None:
    """Print the validation figures of each checkpoint and of the ensembles of the first k."""
    from pipeline.errors import PipelineError
    from pipeline.finetune import RECIPES, FinetuneConfig
    from pipeline.finetune.config import RUNTIME_FIELDS
    from pipeline.finetune.ensemble import ensemble_validation
    from pipeline.finetune.validation import TAR_KEY

    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in checkpoints]
    configs = [c["config"] for c in ckpts]
    splits = {c["seed"] if c.get("split_seed") is None else c["split_seed"] for c in configs}
    if len(splits) > 1 or any(c.get("members", 1) != 1 or c["recipe"] != "best" for c in configs):
        raise PipelineError("join single networks of the best recipe validated on one split (the same split seed)")
    known = set(FinetuneConfig.__dataclass_fields__) - set(RUNTIME_FIELDS)
    values = {k: v for k, v in configs[0].items() if k in known} | {"data_root": data_root, "cache_features": False}
    cfg = FinetuneConfig(out=Path("unused.pt"), **values).resolved()
    trainer = RECIPES["best"].trainer(cfg, torch.device("cpu"))
    groups = [[k] for k in range(len(ckpts))] + [list(range(k)) for k in range(2, len(ckpts) + 1)]
    rows = []
    for group in groups:
        val = ensemble_validation(trainer, [ckpts[k]["model"] for k in group])
        rows.append({"networks": [checkpoints[k].name for k in group], **val})
        click.echo(json.dumps(rows[-1]))
    click.echo("\n| networks | validation AUC | validation TAR@1e-3 |\n| --- | --- | --- |")
    for r in rows:
        tar = "not measurable" if r[TAR_KEY] is None else f"{r[TAR_KEY]:.4f}"  # under 1,000 different-person pairs
        click.echo(f"| {' + '.join(r['networks'])} | {r['val_auc']:.4f} | {tar} |")
