"""The embedding layer of a network: the output or the penultimate features (AlexNet, VGG, SqueezeNet, ResNet; an
`EmbeddingNetwork`'s one layer), the global pooling under them (the average or a learned one), `Embedder` (a
network seen through one layer, with test-time flip) and the embedding's size."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from pipeline.errors import PipelineError

LAYERS = ("output", "penultimate")

POOL = "embedding_pool"
"""The module name of a learned pooling (`add_learned_pool`) in a model and its state_dict."""


def add_learned_pool(model: nn.Module, side: int) -> nn.Conv2d:
    """Give a SqueezeNet or ResNet a learned global pooling for `penultimate`: a depthwise side x side
    convolution (one weight per channel and position, so an aligned face's regions can weigh differently)
    that starts as the average pooling it replaces."""
    if not isinstance(model, (tvm.SqueezeNet, tvm.ResNet)):
        raise PipelineError(
            f"a learned pooling is known for SqueezeNet and ResNet networks, not {type(model).__name__}"
        )
    c = model.fc.in_features if isinstance(model, tvm.ResNet) else model.classifier[1].in_channels
    pool = nn.Conv2d(c, c, side, groups=c, bias=False)
    nn.init.constant_(pool.weight, 1.0 / side**2)
    model.add_module(POOL, pool)
    return pool


def last_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of a SqueezeNet or ResNet (what its global pooling pools)."""
    if isinstance(model, tvm.ResNet):
        m = model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return model.features(x)


@torch.no_grad()
def feature_side(model: nn.Module, input_size: int = 224) -> int:
    """Side of the last feature map for square inputs of `input_size`."""
    return last_features(model, torch.zeros(1, 3, input_size, input_size)).shape[-1]


def pooling(model: nn.Module) -> nn.Module:
    """The global pooling of the penultimate features: the learned one when the model has it, else the average."""
    return getattr(model, POOL, None) or nn.AdaptiveAvgPool2d(1)


class EmbeddingNetwork(nn.Module):
    """A network whose output is its embedding, its only layer (`penultimate` returns it; an ensemble of
    fine-tuned members, `pipeline.nets.split.Ensemble`)."""


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features just before the last classifier layer: 4096-d (AlexNet/VGG, after the second ReLU),
    512-d pooled fire features (SqueezeNet), pooled features (ResNet); an `EmbeddingNetwork`'s output."""
    if isinstance(model, EmbeddingNetwork):
        return model(x)
    if isinstance(model, (tvm.AlexNet, tvm.VGG)):
        x = torch.flatten(model.avgpool(model.features(x)), 1)
        return model.classifier[:-1](x)
    if isinstance(model, (tvm.SqueezeNet, tvm.ResNet)):
        return torch.flatten(pooling(model)(last_features(model, x)), 1)
    raise PipelineError(f"no penultimate layer known for {type(model).__name__}")


def has_penultimate(model: nn.Module) -> bool:
    return isinstance(model, (tvm.AlexNet, tvm.VGG, tvm.SqueezeNet, tvm.ResNet, EmbeddingNetwork))


class Embedder(nn.Module):
    """A backbone seen through one layer: `output` (the 1000-d logits, the study's) or `penultimate`; with
    `flip`, the mean of an image's and its mirror image's (test-time flip)."""

    def __init__(self, model: nn.Module, layer: str = "output", flip: bool = False):
        super().__init__()
        if layer not in LAYERS:
            raise PipelineError(f"unknown layer {layer!r}: use one of {LAYERS}")
        if layer == "penultimate" and not has_penultimate(model):
            raise PipelineError(
                f"--layer penultimate is known for AlexNet, VGG, SqueezeNet and ResNet networks, not "
                f"{type(model).__name__}: use --layer output (the network's output)"
            )
        if layer == "output" and isinstance(model, EmbeddingNetwork):
            raise PipelineError(
                "these weights are an ensemble of fine-tuned networks (finetune --members): its one layer is its "
                "joined embedding; use --layer penultimate"
            )
        self.model, self.layer, self.flip = model, layer, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.one(x)
        return (y + self.one(x.flip(-1))) / 2 if self.flip else y

    def one(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.layer == "output" else penultimate(self.model, x)


def embedding_size(embedder: nn.Module, shape: tuple[int, int, int], device: torch.device) -> int:
    """Size of the embeddings, measured on a batch of two blank images before any is embedded (which also checks
    that the network takes this input size and returns [batch, dim])."""
    try:
        with torch.inference_mode():
            y = embedder(torch.zeros((2, *shape), device=device).contiguous(memory_format=torch.channels_last))
    except Exception as e:
        raise PipelineError(
            f"the network fails on a batch of 2 x {shape[0]} x {shape[1]} x {shape[2]} images ({type(e).__name__}: "
            f"{e}); check --input-size (and --resize) against what the network expects"
        ) from e
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 2:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise PipelineError(f"the network returns {got} for a batch of 2 images: embeddings must be [batch, dim]")
    return int(y.shape[1])
