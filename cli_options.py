"""Command-line options shared by several commands of `cli.py` (and the benchmarks' own commands): each is a
decorator; click builds a new Option each time one is applied. How a command's options and its `--config FILE`
become a stage's config: `cli_config`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import click

IMAGE_SETS = click.Choice(["original", "funneled", "deepfunneled"])
DEVICES = click.Choice(["auto", "cpu", "cuda"])


LFW_ROOT_HELP = "Folder with LFW: lfw-py/<image dir> and the protocol .txt files, or those directly (env LFW_ROOT)."


def data_root_option(f, help: str = LFW_ROOT_HELP):
    return click.option(
        "--data-root", type=click.Path(path_type=Path), envvar="LFW_ROOT", default="data", show_default=True, help=help
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


embed_model_option = click.option(
    "--model",
    default="squeezenet1_0",
    show_default=True,
    help="Any torchvision classification model by name (torchvision.models.list_models(); alexnet, vgg16, "
    "squeezenet1_0, resnet18, resnet50, mobilenet_v3_small, ...), module:function, a function on the Python "
    "path (PYTHONPATH) returning a torch.nn.Module that maps a normalised image batch to embeddings, or "
    "FILE.onnx, an ONNX network run by onnxruntime (its first output is the embedding; no --weights, --layer).",
)


def _three_floats(ctx, param, value: str) -> tuple[float, float, float]:
    """`0.5,0.5,0.5` (or one value for all three channels) -> (R, G, B)."""
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three numbers R,G,B (e.g. 0.5,0.5,0.5), got {value!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise click.BadParameter(f"expected three numbers R,G,B (e.g. 0.5,0.5,0.5), got {value!r}")
    return values


def faceset_options(f):
    """`embed`'s choice of face set: LFW protocol files, a folder per identity, or an insightface `.bin`."""
    for option in reversed(
        [
            click.option(
                "--dataset",
                type=click.Choice(["lfw", "folder", "bin"]),
                default="lfw",
                show_default=True,
                help="lfw: LFW protocol files (--image-set, --protocol, --split); folder: --data-root DIR/<identity>/"
                "<image>, every image; bin: --data-root FILE.bin, an insightface verification set (score --pairs).",
            ),
            click.option(
                "--pairs-file",
                type=click.Path(path_type=Path),
                default=None,
                help="folder: CSV of pairs path_a,path_b,same[,fold] (paths relative to --data-root) for score --pairs.",
            ),
        ]
    ):
        f = option(f)
    return f


def _sizes(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """`240,272` -> (240, 272); `none` or an empty value -> (); unset -> None."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected sizes in pixels, e.g. 240,272 (or none), got {value!r}") from None


def tta_resizes_option(default_help: str, default: str | None):
    return click.option(
        "--tta-resizes",
        default=default,
        callback=_sizes,
        help="Test-time scales: more shorter sides (pixels, e.g. 240,272), each centre-cropped to the input size "
        "too; a row is the mean of the image's embeddings over the crops (none: the one crop). " + default_help,
    )


def network_input_options(f):
    """`embed`'s preprocessing: crop size, resize, normalisation (defaults: torchvision's ImageNet ones)."""
    for option in reversed(
        [
            click.option(
                "--input-size",
                type=int,
                default=None,
                help="Side of the centre crop fed to the network [224; FILE.onnx: the side its graph fixes].",
            ),
            click.option(
                "--resize",
                type=int,
                default=None,
                help="Shorter side before the crop [input size x 256/224]; = --input-size keeps a square image whole.",
            ),
            click.option(
                "--mean",
                default="0.485,0.456,0.406",
                show_default=True,
                callback=_three_floats,
                help="Per-channel mean R,G,B of images in [0, 1] (0.5,0.5,0.5 with --std 0.5,0.5,0.5: inputs in [-1, 1]).",
            ),
            click.option(
                "--std", default="0.229,0.224,0.225", show_default=True, callback=_three_floats, help="Per-channel std."
            ),
        ]
    ):
        f = option(f)
    return f


def network_source_options(weights_help: str):
    """`--data-root`, `--image-set`, `--model` and `--weights` of `finetune` and `run` (LFW, a named network)."""

    def apply(f):
        f = click.option("--weights", default="imagenet", show_default=True, help=weights_help)(f)
        return data_root_option(image_set_option(model_option(f)))

    return apply


def finetune_options(f):
    """Options shared by `finetune` and `run` (recipe values; unset ones take the recipe's preset)."""
    for option in reversed(
        [
            click.option(
                "--recipe",
                type=LazyChoice(recipes),
                default="study",
                show_default=True,
                help="The fine-tuning recipe (the recipes are listed below).",
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
            click.option(
                "--train-blocks",
                type=int,
                default=None,
                help="best: how many of the last blocks train (SqueezeNet Fire modules 1-8; ResNet layers 1-4) [preset].",
            ),
            click.option(
                "--lr-decay",
                type=float,
                default=None,
                help="best: the k-th trained block below the last learns at lr x LR_DECAY^k [preset].",
            ),
            click.option(
                "--pool",
                type=click.Choice(["avg", "learned"]),
                default=None,
                help="best: global pooling of the embedding: the network's average, or learned per channel and "
                "position (starts as the average; saved in the checkpoint) [preset].",
            ),
            click.option(
                "--tta-flip/--no-tta-flip",
                default=None,
                help="best: embed an image as the mean of its own and its mirror image's features (validation and "
                "run's stores) [preset].",
            ),
            click.option(
                "--feature-shift",
                type=int,
                default=None,
                help="best: augmentation: move each cached feature map by a random 0 to N cells on both axes [preset].",
            ),
            click.option(
                "--ema",
                type=float,
                default=None,
                help="best: keep a moving average of the trained weights with this decay per step (0: none); "
                "validation, the kept epoch and the final weights are the average's [preset].",
            ),
            click.option(
                "--members",
                type=int,
                default=None,
                help="best: train N networks (seeds SEED + 1000 k, one validation split) and embed with all: the "
                "concatenation of their unit-length embeddings (OUT.member<k>.pt each; OUT joins them) [preset].",
            ),
            click.option(
                "--cohort-top",
                type=int,
                default=None,
                help="best: cohort score normalisation (0: none). The checkpoint keeps its training images' "
                "embedding; embed writes each image's offset o (half the mean of its K largest cosines with them) "
                "and score scores cos - o_i - o_j [preset].",
            ),
            click.option(
                "--bf16/--no-bf16",
                default=None,
                help="On the CPU, train under bfloat16 autocast (weights, loss, validation and embedding stay "
                "float32): faster on CPUs with AVX-512 BF16 or AMX, slower on others [preset].",
            ),
            click.option(
                "--study-max",
                type=click.Choice(["with-batch", "before-batch"]),
                default="with-batch",
                show_default=True,
                help="study: what divides a batch's distances: the largest seen, this batch included (the study's), "
                "or the largest of the batches before it (distances above it clipped just below 1).",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed."),
        ]
    ):
        f = option(f)
    return f


def embed_options(f):
    """All options of `embed`."""
    for option in reversed(
        [
            lambda f: data_root_option(
                f, LFW_ROOT_HELP[:-1] + "; --dataset folder: DIR/<identity>/<image>; --dataset bin: the .bin file."
            ),
            faceset_options,
            image_set_option,
            click.option(
                "--protocol",
                type=click.Choice(["people", "pairs", "10fold"]),
                default="people",
                show_default=True,
                help="people: View 1 people (all-pairs); pairs: View 1 pairs; 10fold: View 2 pairs.txt with folds.",
            ),
            click.option(
                "--split",
                type=click.Choice(["train", "test", "validation"]),
                default="test",
                show_default=True,
                help="View 1 split (ignored by 10fold); validation (with --protocol people): the held-out images "
                "the finetune checkpoint --weights validated on.",
            ),
            embed_model_option,
            click.option(
                "--weights",
                default=None,
                help="imagenet (torchvision's weights; the default for a named model), none (random init, or for "
                "module:function the network as the function returns it: its default), or PATH to a state_dict / "
                "finetune checkpoint.",
            ),
            network_input_options,
            click.option(
                "--tta-flip",
                is_flag=True,
                help="Test-time flip: each row is the mean of the image's and its mirror image's outputs (what a "
                "--recipe best model with --tta-flip was validated with).",
            ),
            tta_resizes_option("[none]", "none"),
            click.option(
                "--layer",
                type=click.Choice(["output", "penultimate"]),
                default=None,
                help="output: the network output (1000-d for ImageNet classifiers; the study's) [default]; "
                "penultimate: features before the last classifier layer (AlexNet, VGG, SqueezeNet, ResNet networks).",
            ),
            click.option("--out", type=click.Path(path_type=Path), required=True, help="Output HDF5 store."),
            click.option(
                "--batch-size",
                type=int,
                default=32,
                show_default=True,
                help="Images per forward pass (a resumed run must use the same).",
            ),
            workers_option,
            device_option,
            click.option(
                "--limit", type=int, default=None, help="Only the first N images (people) or pairs (pair protocols)."
            ),
            click.option(
                "--resume", is_flag=True, help="Continue OUT.partial of an interrupted run with the same settings."
            ),
            click.option("--overwrite", is_flag=True, help="Replace an existing OUT (only a store that embed wrote)."),
            click.option(
                "--skip-bad",
                is_flag=True,
                help="Leave out unreadable images (recorded in the store) instead of stopping.",
            ),
            click.option(
                "--skip-missing", is_flag=True, help="Leave out listed images that are missing instead of stopping."
            ),
            click.option(
                "--dtype",
                type=click.Choice(["float32", "float16"]),
                default="float32",
                show_default=True,
                help="Storage type of /embeddings.",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed (matters with --weights none)."),
            click.option("--download", is_flag=True, help="Try torchvision's LFW download into the data root first."),
            click.option(
                "--deterministic",
                is_flag=True,
                help="Rows independent of thread count and number of ranks (bit-identical under torchrun); slower on CPU (oneDNN off; docs/embedding.md).",
            ),
        ]
    ):
        f = option(f)
    return f


# ---- recipes: the registry's names, read when an option is parsed or its help shown


class LazyChoice(click.Choice):
    """A choice among names that `load` returns, called when the option is parsed or its help shown (a registry
    that imports torch is then imported for that command only, and `cli.py --help` stays quick)."""

    def __init__(self, load: Callable[[], Iterable[str]]):
        self._load, self.case_sensitive = load, True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())


def recipes() -> dict:
    """`pipeline.finetune.recipes.RECIPES` (name -> Recipe), complete once the package is imported."""
    from pipeline.finetune.recipes import RECIPES

    return RECIPES


def recipe_notes() -> dict[str, list[tuple[str, str]]]:
    """The recipes for a command's help: name and summary of each."""
    return {"Recipes (--recipe)": [(name, r.summary) for name, r in recipes().items()]}
