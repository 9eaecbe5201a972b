"""What each part of `--recipe best` adds, on validation only (held-out training people; the test splits are never
looked at): two trainings, then each part taken away where it acts and weighed by `compare` (paired jackknife over
identity groups: difference, 95% interval, p) on the same validation pairs.

    python -m benchmarks.weigh_parts --data-root ../shared/data \
        --weights ../shared/weights/squeezenet1_0-imagenet-dc.pth --out runs/parts [--set bf16=false] [--seed 0]

Trainings (resumed, or read back when complete): OUT/preset.pt, the preset (members OUT/preset.member<k>.pt), and
OUT/avgpool.pt, one network of the same seed with average pooling and no cohort. Every side is the validation images
embedded by `embed` (`embedded`; finetune's own folders may come from its float16 feature cache) and scored. Each
part "with" against "without", every other part as in the preset:

| part | with | without |
| --- | --- | --- |
| cohort normalisation | preset.validation-embedded | preset.validation-embedded.h5 scored without its offsets |
| ensemble of members | preset.validation-embedded.h5 scored without its offsets | member 0 alone (no cohort) |
| test-time scales | preset.validation-embedded (with the recipe's scales) or the validation images embedded with `SCALES` (a recipe without) | the validation images embedded by the preset with the flip alone, or preset.validation-embedded |
| learned pooling | member 0 alone | avgpool.validation-embedded |

`--set KEY=VALUE` (JSON) changes both trainings alike: on a CPU without native bfloat16, `bf16=false` trains in
float32, about 5-10 times faster there, and the comparison then holds for float32 training."""

from __future__ import annotations

import json
from pathlib import Path

import click

KEYS = (("auc", None), ("tar_at_far", "0.001"))
SCALES = (240, 272)  # the test-time scales weighed where the recipe has none (the preset's until 2026-12-07)


def trained(data_root: Path, weights: str, out: Path, seed: int, values: dict) -> Path:
    """`finetune --recipe best` with `values` into `out` (resumed; read back when complete)."""
    from pipeline.finetune import FinetuneConfig, finetune

    return finetune(
        FinetuneConfig(out=out, data_root=data_root, weights=weights, recipe="best", seed=seed, resume=True, **values)
    )


def scored(store: Path, folder: Path, score_norm: bool = True) -> Path:
    """All pairs of `store` into `folder` (reused when complete), with or without its score offsets."""
    from pipeline.scoring.stage import score_store

    if not (folder / "metrics.json").is_file():
        score_store(store, folder, metric="cosine", score_norm=score_norm, overwrite=True)
    return folder


def embedded(checkpoint: Path, data_root: Path, name: str, resizes: tuple[int, ...]) -> Path:
    """The checkpoint's validation images embedded with the test-time flip and `resizes`, scored into the folder
    CHECKPOINT-STEM.NAME/ (both reused when there)."""
    from pipeline.embedding.embed import EmbedConfig, embed

    store = checkpoint.with_name(f"{checkpoint.stem}.{name}.h5")
    if not store.is_file():
        embed(EmbedConfig(out=store, data_root=data_root, split="validation", weights=str(checkpoint),
                          layer="penultimate", tta_flip=True, tta_resizes=resizes, batch_size=16))  # fmt: skip
    return scored(store, store.with_suffix(""))


def weighed(without: Path, with_: Path) -> dict:
    """`compare` of two results folders: A = without the part, B = with it."""
    from pipeline.report.compare import compare, read_scored

    return compare(read_scored(without), read_scored(with_))


def row(part: str, result: dict) -> str:
    """One table row: AUC and TAR at FAR 1e-3 without -> with, difference [interval], p."""
    cells = []
    for key, far in KEYS:
        r = result[key] if far is None else result[key][far]
        if r["difference"] is None:
            cells.append("not measurable")
            continue
        cell = f"{r['a']:.4f} -> {r['b']:.4f}: {r['difference']:+.4f}"
        if r["ci95"] is None:  # too few identity groups for the jackknife
            cells.append(cell + ", no interval")
            continue
        lo, hi = r["ci95"]
        cells.append(cell + f" [{lo:+.4f}, {hi:+.4f}], p {r['p_value']:.2g}")
    return f"| {part} | " + " | ".join(cells) + " |"


@click.command("weigh-parts")
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--weights", required=True, help="Starting weights (the shared SqueezeNet file).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of both trainings (and the split).")
@click.option("--set", "extra", multiple=True, help="KEY=VALUE (JSON value) for both trainings.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def command(data_root: Path, weights: str, seed: int, extra, out: Path) -> None:
    """Train the best preset and its average-pooling variant; print what each part adds on validation."""
    from pipeline.finetune.ensemble import member_path
    from pipeline.finetune.recipes import RECIPES

    values = {k: json.loads(v) for k, v in (e.split("=", 1) for e in extra)}
    preset = trained(data_root, weights, out / "preset.pt", seed, values)
    avgpool = trained(data_root, weights, out / "avgpool.pt", seed, {**values, "pool": "avg", "members": 1,
                                                                    "cohort_top": 0})  # fmt: skip
    scales = RECIPES["best"].tta_resizes
    full = embedded(preset, data_root, "validation-embedded", scales)
    no_norm = scored(full.with_name(full.name + ".h5"), out / "preset.validation-no-cohort", score_norm=False)
    member0 = embedded(member_path(preset, 0), data_root, "validation", scales)
    parts = {
        "cohort normalisation": (no_norm, full),
        "ensemble of members": (member0, no_norm),
        "test-time scales": (embedded(preset, data_root, "validation-flip-only", ()), full)
        if scales
        else (full, embedded(preset, data_root, "validation-scales", SCALES)),
        "learned pooling": (embedded(avgpool, data_root, "validation-embedded", scales), member0),
    }
    click.echo("\n| part (without -> with) | validation AUC | validation TAR at FAR 1e-3 |\n| --- | --- | --- |")
    for part, (without, with_) in parts.items():
        click.echo(row(part, weighed(without, with_)))


if __name__ == "__main__":
    command()
