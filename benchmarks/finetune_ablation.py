"""Ablation of `--recipe best`: each variant is a set of `FinetuneConfig` values (recipes as data), trained on
peopleDevTrain and measured only on its held-out training people (validation AUC and TAR at FAR 1e-3, exact,
all pairs of up to 600 images). The test splits are never looked at.

    python -m benchmarks.finetune_ablation --data-root ../shared/data \
        --weights ../shared/weights/squeezenet1_0-imagenet-dc.pth --variant base --variant blocks4 --out runs/ablation

Each variant (a change of START) writes OUT/NAME.pt (+ .log, .training.png); a finished variant is read back, not retrained.
Prints one table row per variant: its best validation epoch, AUC and TAR there, and its wall time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

# The recipe the ablation started from (the preset before 2026-11-28's ablation); each variant changes it.
START = dict(phase1_epochs=10, lr_decay=1.0, pool="avg", tta_flip=False, members=1)
# name -> FinetuneConfig values on top of START and --recipe best's preset (pipeline/finetune/best.py)
VARIANTS: dict[str, dict] = {
    "base": {},
    "tta": dict(tta_flip=True),
    "blocks3": dict(train_blocks=3),
    "blocks4": dict(train_blocks=4),
    "blocks5": dict(train_blocks=5),
    "blocks3-decay0.3": dict(train_blocks=3, lr_decay=0.3),
    "blocks4-decay0.3": dict(train_blocks=4, lr_decay=0.3),
    "blocks4-decay0.3-bf16": dict(train_blocks=4, lr_decay=0.3, bf16=True),
    "bf16": dict(bf16=True),
    "scale40": dict(scale=40.0),
    "pool-learned": dict(pool="learned"),
    "epochs20": dict(phase1_epochs=20),
    "cosface": dict(loss="cosface", scale=30.0, margin=0.2),
    "k8": dict(images_per_person=8),
    "final": dict(phase1_epochs=40, pool="learned", tta_flip=True),
    "final-bf16": dict(phase1_epochs=40, pool="learned", tta_flip=True, bf16=True),
    "final-bf16-shift1": dict(phase1_epochs=40, pool="learned", tta_flip=True, bf16=True, feature_shift=1),
    "final-bf16-e80": dict(phase1_epochs=80, pool="learned", tta_flip=True, bf16=True),
    "final-bf16-shift1-e80": dict(phase1_epochs=80, pool="learned", tta_flip=True, bf16=True, feature_shift=1),
    "final-bf16-singletons": dict(phase1_epochs=40, pool="learned", tta_flip=True, bf16=True, singletons=True),
    "final-bf16-ema": dict(phase1_epochs=40, pool="learned", tta_flip=True, bf16=True, ema=0.995),
    "final-bf16-members2": dict(phase1_epochs=40, pool="learned", tta_flip=True, bf16=True, members=2),
    "final-bf16-members3": dict(phase1_epochs=40, pool="learned", tta_flip=True, bf16=True, members=3),
    "final-blocks4": dict(phase1_epochs=40, pool="learned", tta_flip=True, train_blocks=4, lr_decay=0.3, bf16=True),
}


def summary(log_path: Path) -> dict:
    """Best validation epoch of a finished variant's log and the total seconds of its epochs (an ensemble's log:
    its one record; each member's best epoch is in its own log)."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if records and records[-1].get("member") == "ensemble":
        r = records[-1]
        return {
            "epochs": r["epoch"],
            "best_epoch": "(members')",
            "val_auc": r["val_auc"],
            "val_tar": r["val_tar_at_far_0.001"],
        }
    trained = [r for r in records if r.get("loss") is not None and r.get("val_auc") is not None]
    best = max(trained, key=lambda r: r["val_auc"])
    return {
        "epochs": len(trained),
        "best_epoch": best["epoch"],
        "val_auc": best["val_auc"],
        "val_tar": best["val_tar_at_far_0.001"],
        "val_auc_0": records[0]["val_auc"],
    }


@click.command("finetune-ablation")
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--weights", required=True, help="Starting weights (the shared SqueezeNet file).")
@click.option("--model", default="squeezenet1_0", show_default=True)
@click.option("--variant", "variants", multiple=True, type=click.Choice(sorted(VARIANTS)), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "extra", multiple=True, help="KEY=VALUE (JSON value) added to every variant.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def command(data_root: Path, weights: str, model: str, variants, seed: int, extra, out: Path) -> None:
    """Train each variant of the best recipe and print its validation figures."""
    from pipeline.finetune import FinetuneConfig, finetune

    common = {k: json.loads(v) for k, v in (e.split("=", 1) for e in extra)}
    rows = []
    for name in variants:
        values = {**VARIANTS[name], **common}
        settings = {**START, **values}
        tag = name + "".join(f"-{k}{v}" for k, v in common.items()) + (f"-seed{seed}" if seed else "")
        path = out / f"{tag}.pt"
        t0 = time.perf_counter()
        cfg = FinetuneConfig(
            out=path,
            data_root=data_root,
            model=model,
            weights=weights,
            recipe="best",
            seed=seed,
            resume=True,
            **settings,
        )
        finetune(cfg)
        rows.append(
            {
                "variant": tag,
                "values": values,
                "minutes": (time.perf_counter() - t0) / 60,
                **summary(path.with_suffix(".log")),
            }
        )
        click.echo(json.dumps(rows[-1]))
    click.echo("\n| variant | values | epochs | best epoch | val AUC | val TAR@1e-3 | minutes (this call) |")
    click.echo("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        click.echo(
            f"| {r['variant']} | {json.dumps(r['values'])} | {r['epochs']} | {r['best_epoch']} | {r['val_auc']:.4f} "
            f"| {'not measurable' if r['val_tar'] is None else format(r['val_tar'], '.4f')} | {r['minutes']:.1f} |"
        )


if __name__ == "__main__":
    command()
