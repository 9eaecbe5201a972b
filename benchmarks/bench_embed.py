"""Benchmark of `embed`: images/s of the whole stage (decode, transform, forward, HDF5 write) against
model-only forward passes on already-decoded tensors, measured in the same run on the same device.

    python -m benchmarks.bench_embed --data-root ../shared/data      (same as: cli.py bench embed ...)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from cli_options import data_root_option
from pipeline.embedding.embed import EmbedConfig, embed, for_inference, forward
from pipeline.faces import images, lfw
from pipeline.nets import layers, models
from pipeline.runtime import resolve_device


@dataclass(frozen=True)
class BenchEmbedConfig:
    """Options of `cli.py bench embed`."""

    data_root: Path
    """LFW data root (the 3,708 LFWPeople test images are embedded)."""
    models: tuple[str, ...] = ("squeezenet1_0", "alexnet")
    """Backbones to time (random weights: speed does not depend on them)."""
    limit: int | None = None
    """Embed only the first N images (default: all 3,708)."""
    batch_size: int = 32
    """Images per forward pass, for both measurements."""
    workers: int = 2
    """DataLoader workers of the whole-stage run."""
    device: str = "auto"
    """auto | cpu | cuda."""
    decoded: int = 256
    """Images decoded in advance for the model-only measurement."""
    deterministic: bool = False
    """Time `embed --deterministic` (oneDNN off: thread-independent rows)."""

    def __post_init__(self):
        if not self.models:
            raise ValueError("give at least one model")
        if self.decoded < self.batch_size:
            raise ValueError("decoded must be at least one batch")


def model_only_rate(
    name: str, images: torch.Tensor, batch_size: int, device: torch.device, deterministic: bool = False
) -> float:
    """Images/s of forward passes alone over decoded, transformed images (after one warm-up batch)."""
    embedder = for_inference(layers.Embedder(models.build_model(name, "none"), "output"), device)
    batches = images.split(batch_size)
    forward(embedder, batches[0], device, deterministic)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x in batches:
        forward(embedder, x, device, deterministic)  # ends with .cpu(): synchronised
    return len(images) / (time.perf_counter() - start)


def run_bench(cfg: BenchEmbedConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    proto = lfw.load_protocol(cfg.data_root, "deepfunneled", "people", "test").limit(cfg.limit)
    tf = images.imagenet_crop()
    decoded = torch.stack([tf(images.load_image(proto.absolute(i % len(proto)))) for i in range(cfg.decoded)])
    rows = []
    for name in cfg.models:
        before = model_only_rate(name, decoded, cfg.batch_size, device, cfg.deterministic)
        with tempfile.TemporaryDirectory() as tmp:
            ecfg = EmbedConfig(
                out=Path(tmp) / "bench.h5",
                data_root=cfg.data_root,
                model=name,
                weights="none",
                deterministic=cfg.deterministic,
                limit=cfg.limit,
                batch_size=cfg.batch_size,
                workers=cfg.workers,
                device=cfg.device,
            )
            start = time.perf_counter()
            embed(ecfg)
            seconds = time.perf_counter() - start
        after = model_only_rate(name, decoded, cfg.batch_size, device, cfg.deterministic)
        model_rate = (before + after) / 2  # the machine drifts: average the two sides of the embed run
        stage_rate = len(proto) / seconds
        rows.append(
            dict(
                model=name,
                device=str(device),
                images=len(proto),
                embed_seconds=seconds,
                embed_rate=stage_rate,
                model_rate=model_rate,
                ratio=stage_rate / model_rate,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model | device | images | embed s | embed img/s | model-only img/s | embed / model-only |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['device']} | {r['images']} | {r['embed_seconds']:.1f} | {r['embed_rate']:.1f} "
            f"| {r['model_rate']:.1f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


@click.command("embed")
@data_root_option
@click.option("--models", default="squeezenet1_0,alexnet", show_default=True, help="Comma-separated backbones.")
@click.option("--limit", type=int, default=None, help="Only the first N LFWPeople test images (default all 3,708).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True, help="Image-decoding worker processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--deterministic", is_flag=True, help="Time `embed --deterministic` (oneDNN off).")
@click.option(
    "--decoded",
    type=int,
    default=256,
    show_default=True,
    help="Images decoded in advance for the model-only measurement.",
)
def command(models: str, **options) -> None:
    """Images/s of the whole `embed` against model-only forward passes, in the same run."""
    click.echo(format_table(run_bench(BenchEmbedConfig(models=tuple(models.split(",")), **options))))


if __name__ == "__main__":
    command()
