"""The saving of `run`'s shared embedding pass: the four test stores (pretrained and fine-tuned, LFWPairs test and
LFWPeople test) written by four `embed` calls, then by one `shared_embed.embed_together` pass; prints both
times and the largest difference between their rows.

    python -m benchmarks.bench_run_embed --data-root ../shared/data \
        --weights ../shared/weights/squeezenet1_0-imagenet-dc.pth --checkpoint runs/squeezenet-best/finetune/model.pt
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import h5py
import numpy as np
import torch


@click.command("run-embed")
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--weights", required=True, help="The pretrained weights.")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="A --recipe best checkpoint.")
@click.option("--limit", type=int, default=None, help="Only the first N pairs / images.")
@click.option("--workers", type=int, default=2, show_default=True)
def command(data_root: Path, weights: str, checkpoint: Path, limit: int | None, workers: int) -> None:
    """Four embed calls against one shared pass, on the real test splits."""
    from pipeline.embedding.embed import EmbedConfig, embed
    from pipeline.embedding.shared import embed_together

    config = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    nets = {"pretrained": (weights, False), "finetuned": (str(checkpoint), bool(config.get("tta_flip")))}
    with tempfile.TemporaryDirectory() as tmp:

        def cfgs(folder: str) -> list[EmbedConfig]:
            return [
                EmbedConfig(
                    out=Path(tmp) / folder / f"{v}-{p}.h5",
                    data_root=data_root,
                    protocol=p,
                    model=config["model"],
                    weights=w,
                    layer=config["layer"],
                    tta_flip=flip,
                    batch_size=64,
                    workers=workers,
                    limit=limit,
                )
                for v, (w, flip) in nets.items()
                for p in ("pairs", "people")
            ]

        t0 = time.perf_counter()
        separate = [embed(c) for c in cfgs("separate")]
        t_separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        shared = embed_together(cfgs("shared"), config.get("train_blocks"))
        t_shared = time.perf_counter() - t0
        diff = 0.0
        for a, b in zip(separate, shared, strict=True):
            with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
                diff = max(diff, float(np.abs(f["embeddings"][:] - g["embeddings"][:]).max()))
    click.echo("| way | seconds | ratio |")
    click.echo("| --- | --- | --- |")
    click.echo(f"| four embed calls | {t_separate:.1f} | 1.00 |")
    click.echo(f"| one shared pass (run) | {t_shared:.1f} | {t_shared / t_separate:.2f} |")
    click.echo(f"largest difference between the rows of the two ways: {diff:.3g}")


if __name__ == "__main__":
    command()
