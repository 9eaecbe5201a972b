"""Backbone registry: torchvision's classification networks by name (with their ImageNet weights), the user's own
networks (`module:function`), weights files (state_dicts, `finetune` checkpoints and their ensembles). The
embedding layer taken from a network: `pipeline.nets.layers`; ONNX networks (`FILE.onnx`, `embed` only):
`pipeline.nets.onnx_model`.

The five backbones of `BACKBONES` (the study's and the project's) have registered embedding sizes and a
`penultimate` layer; any other model of `torchvision.models.list_models(module=torchvision.models)` is built with
`get_model` and embeds with its output (penultimate where its type is one of the four known families)."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from pipeline.errors import PipelineError
from pipeline.nets.factory import build_factory
from pipeline.nets.layers import POOL, add_learned_pool
from pipeline.nets.onnx_model import fixed_input_size, is_onnx
from pipeline.nets.split import Ensemble, join_members

log = logging.getLogger(__name__)
HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")  # torchvision names its files NAME-<sha256 prefix>.pth


@dataclass(frozen=True)
class Backbone:
    """How to build one architecture and where its penultimate features are."""

    build: Callable[..., nn.Module]
    imagenet: object
    """torchvision's default ImageNet weights enum member."""
    penultimate_dim: int
    output_dim: int = 1000


BACKBONES: dict[str, Backbone] = {
    "alexnet": Backbone(tvm.alexnet, tvm.AlexNet_Weights.DEFAULT, 4096),
    "vgg16": Backbone(tvm.vgg16, tvm.VGG16_Weights.DEFAULT, 4096),
    "squeezenet1_0": Backbone(tvm.squeezenet1_0, tvm.SqueezeNet1_0_Weights.DEFAULT, 512),
    "resnet18": Backbone(tvm.resnet18, tvm.ResNet18_Weights.DEFAULT, 512),
    "resnet50": Backbone(tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, 2048),
}


def registry_models() -> list[str]:
    """torchvision's classification models (`list_models(module=torchvision.models)`)."""
    return tvm.list_models(module=tvm)


def is_factory(name: str) -> bool:
    """`module:function`: the user's own network."""
    return ":" in name and not is_onnx(name)


def unknown_model(name: str) -> str:
    close = difflib.get_close_matches(name, registry_models(), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (
        f"unknown model {name!r}: use a torchvision classification model (one of {len(registry_models())}: "
        f"{', '.join(sorted(BACKBONES))}, mobilenet_v3_small, ...; see torchvision.models.list_models()) or "
        f"module:function for your own network.{hint}"
    )


def check_model_name(name: str) -> None:
    """ValueError (a configuration error) unless `name` is a torchvision model, a `module:function` spec or an
    ONNX file name (`FILE.onnx`: read when the network is loaded)."""
    if is_onnx(name):
        return
    if is_factory(name):
        module, _, func = name.partition(":")
        if not (all(p.isidentifier() for p in module.split(".")) and func.isidentifier()):
            raise ValueError(
                f"--model {name!r} is not module:function (e.g. mynets.faces:build: a module on the Python path "
                f"and a function in it that returns a torch.nn.Module)"
            )
    elif name not in BACKBONES and name not in registry_models():
        raise ValueError(unknown_model(name))


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise PipelineError(f"unknown model {name!r}: choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def imagenet_weights(name: str):
    """torchvision's default ImageNet weights enum member of a registry model."""
    if name in BACKBONES:
        return BACKBONES[name].imagenet
    if is_factory(name) or name not in registry_models():
        raise PipelineError(f"{name} has no ImageNet weights in torchvision: pass --weights none or --weights PATH")
    return tvm.get_model_weights(name).DEFAULT


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, downloaded into the torch cache on first use. The file is checked against
    the sha256 prefix in its published name and read with `weights_only=True`: a file planted in the cache
    runs no code."""
    weights = imagenet_weights(name)
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.exists():
        try:
            weights.get_state_dict(progress=True, check_hash=True, weights_only=True)  # downloads, checks the hash
        except Exception as e:  # URLError, socket errors, HTTP errors: all mean "not available offline"
            raise PipelineError(
                f"cannot get ImageNet weights for {name} ({type(e).__name__}: {e}). torchvision looks for "
                f"{cached}; put the file {filename} there (from {weights.url}), or pass --weights PATH to a saved "
                f"state_dict."
            ) from e
    match = HASH_PREFIX.search(filename)
    if match and not sha256(cached).startswith(match.group(1)):
        raise PipelineError(
            f"{cached} is not torchvision's {filename}: its sha256 does not start with {match.group(1)}. Delete "
            f"it (the next run downloads it again), or pass --weights PATH to a saved state_dict."
        )
    try:
        return torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PipelineError(f"cannot read cached ImageNet weights {cached}: {e}. Delete it and retry.") from e


def read_weights_file(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """A plain state_dict or a `finetune` checkpoint -> (state_dict, checkpoint metadata or {})."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist; pass imagenet, none, or an existing file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PipelineError(f"cannot read weights file {path}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"], {k: v for k, v in obj.items() if k not in ("model", "optimizer")}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise PipelineError(f"{path} is neither a state_dict nor a finetune checkpoint")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Strict load; a mismatch (another architecture) is a PipelineError that says so."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise PipelineError(
            f"weights {source} do not fit model {name}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}. "
            f"Are they for another architecture? Pass --model matching the weights."
        )
    model.load_state_dict(state)


def _load_file(model: nn.Module, name: str, weights: str) -> nn.Module:
    state, meta = read_weights_file(weights)
    config = meta.get("config", {})
    trained = config.get("model")
    if trained is not None and trained != name:
        raise PipelineError(f"checkpoint {weights} was trained for model {trained}, not {name}; pass --model {trained}")
    if meta.get("members"):  # finetune --members: the ensemble of the checkpoint's networks
        return ensemble_model(name, [state, *meta["members"]], config.get("train_blocks"), str(weights))
    load_into(model, state, name, str(weights))
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """`load_state`, adding the learned pooling first when the weights were fine-tuned with one."""
    if f"{POOL}.weight" in state and not hasattr(model, POOL):
        add_learned_pool(model, state[f"{POOL}.weight"].shape[-1])
    load_state(model, state, name, source)


def ensemble_model(name: str, states: list[dict[str, torch.Tensor]], blocks: int | None, source: str) -> Ensemble:
    """The `Ensemble` of `finetune --members` from its members' state_dicts (`blocks`: the trained blocks)."""
    members = []
    for state in states:
        model = build_model(name, "none")
        load_into(model, state, name, source)
        members.append(model)
    return join_members(members, blocks)


@contextlib.contextmanager
def _builder_reads(weights, state: dict[str, torch.Tensor]):
    """torchvision's builder loads `weights` itself (adapting the model to them: auxiliary heads, input
    transform); here it is handed `state`, read safely, instead of loading the cached file without
    `weights_only`."""
    cls = type(weights)
    own = cls.__dict__.get("get_state_dict")
    cls.get_state_dict = lambda self, *args, **kwargs: state
    try:
        yield
    finally:
        if own is None:
            del cls.get_state_dict
        else:
            cls.get_state_dict = own


def build_model(name: str, weights: str = "imagenet") -> nn.Module:
    """Build `name` with `weights`: `imagenet`, `none` (random init; for `module:function`, the network as the
    function returns it) or a path to a state_dict/checkpoint."""
    if is_onnx(name):
        raise PipelineError(
            f"--model {name}: an ONNX network is run by `embed` only (onnxruntime); fine-tuning and `run` need the "
            f"PyTorch network (a torchvision name or module:function)"
        )
    if is_factory(name):
        if weights == "imagenet":
            raise PipelineError(
                f"--model {name} has no ImageNet weights: pass --weights none (the network as it is returned) or "
                f"--weights PATH (a state_dict for it)"
            )
        model = build_factory(name)
        return model if weights == "none" else _load_file(model, name, weights)
    if name not in BACKBONES:
        if name not in registry_models():
            raise PipelineError(unknown_model(name))
        if weights != "imagenet":
            model = tvm.get_model(name, weights=None)
            return model if weights == "none" else _load_file(model, name, weights)
        default = imagenet_weights(name)
        state = imagenet_state_dict(name)
        with _builder_reads(default, state):
            return tvm.get_model(name, weights=default)
    model = backbone(name).build(weights=None)
    if weights == "none":
        return model
    if weights == "imagenet":
        load_state(model, imagenet_state_dict(name), name, "imagenet")
        return model
    return _load_file(model, name, weights)


def weights_provenance(weights: str) -> dict[str, str]:
    """What to record about the weights in a store: the spec and, for a file, its sha256."""
    if weights in ("imagenet", "none"):
        return {"weights": weights, "weights_sha256": ""}
    if not Path(weights).is_file():
        raise PipelineError(f"weights file {weights} does not exist; pass imagenet, none, or an existing file")
    return {"weights": str(Path(weights).resolve()), "weights_sha256": sha256(weights)}


def network_provenance(model: str, weights: str) -> dict[str, str]:
    """`weights_provenance`; for an ONNX network, which holds its weights, the model file and its sha256."""
    if not is_onnx(model):
        return weights_provenance(weights)
    if not Path(model).is_file():
        raise PipelineError(f"ONNX model {model} does not exist; pass --model with an existing .onnx file")
    return {"weights": str(Path(model).resolve()), "weights_sha256": sha256(model)}


def embed_network_options(model: str, weights: str | None, layer: str | None, input_size: int | None) -> dict:
    """`embed`'s --weights, --layer and --input-size as given (None: left out) -> their values: weights
    `imagenet` for a torchvision name, `none` for module:function, layer `output`, input size 224. An ONNX file
    holds its weights and its output is the embedding: passing --weights or --layer is a ValueError; its input
    size is the one its graph fixes (else 224)."""
    if is_onnx(model):
        given = [f"--{name}" for name, value in (("weights", weights), ("layer", layer)) if value is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to an ONNX model: {model} "
                f"holds its weights and its first output is the embedding; leave {' and '.join(given)} out"
            )
        if input_size is None:
            input_size = fixed_input_size(model) or 224
        return {"weights": "none", "layer": "output", "input_size": input_size}
    return {
        "weights": weights or ("none" if is_factory(model) else "imagenet"),
        "layer": layer or "output",
        "input_size": 224 if input_size is None else input_size,
    }
