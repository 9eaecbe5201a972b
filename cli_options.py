"""Command-line options shared by several commands of `cli.py` (and the benchmarks' own commands): each is a
decorator; click builds a new Option each time one is applied."""

from __future__ import annotations

from pathlib import Path

import click

IMAGE_SETS = click.Choice(["original", "funneled", "deepfunneled"])
DEVICES = click.Choice(["auto", "cpu", "cuda"])


def data_root_option(f):
    return click.option(
        "--data-root",
        type=click.Path(path_type=Path),
        envvar="LFW_ROOT",
        default="data",
        show_default=True,
        help="Folder with LFW: lfw-py/<image dir> and the protocol .txt files, or those directly (env LFW_ROOT).",
    )(f)


# Options shared by several commands (click builds a new Option each time a decorator is applied).
image_set_option = click.option(
    "--image-set", type=IMAGE_SETS, default="deepfunneled", show_default=True, help="Which LFW images."
)
model_option = click.option(
    "--model",
    default="squeezenet1_0",
    show_default=True,
    help="Backbone: alexnet, vgg16, squeezenet1_0, resnet18, resnet50.",
)
device_option = click.option(
    "--device", type=DEVICES, default="auto", show_default=True, help="auto picks CUDA when present."
)
workers_option = click.option(
    "--workers", type=int, default=2, show_default=True, help="Image-decoding worker processes."
)


def finetune_options(f):
    """Options shared by `finetune` and `run` (recipe values; unset ones take the recipe's preset)."""
    for option in reversed(
        [
            click.option(
                "--recipe",
                type=click.Choice(["study", "best"]),
                default="study",
                show_default=True,
                help="study: the study's Siamese recipe; best: the project's recipe (docs/finetuning.md).",
            ),
            click.option(
                "--phase1-epochs", type=int, default=None, help="Epochs with the frozen part frozen [preset]."
            ),
            click.option("--phase2-epochs", type=int, default=None, help="Epochs training the whole network [preset]."),
            click.option(
                "--batch-size", type=int, default=None, help="Pairs (study) or images (best) per step [preset]."
            ),
            click.option("--lr", type=float, default=None, help="Learning rate [preset]."),
            click.option("--momentum", type=float, default=None, help="SGD momentum [preset]."),
            click.option(
                "--max-pairs",
                type=int,
                default=None,
                help="Quick runs: the first N/2 same and N/2 different training pairs (best: N images).",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed."),
        ]
    ):
        f = option(f)
    return f
