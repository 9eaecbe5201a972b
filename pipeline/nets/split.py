"""A backbone cut into a frozen part and a trained tail (fine-tuning trains the tail on cached features of the
frozen part; `run` shares equal frozen parts between networks), and the ensemble that joins the tails of members
fine-tuned from one backbone."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from pipeline.errors import PipelineError
from pipeline.nets.layers import EmbeddingNetwork, pooling


def split_model(model: nn.Module, layer: str, blocks: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(frozen, tail) with tail(frozen(x)) = model(x) for `output` (frozen = the convolutional features,
    tail = the classifier) or = penultimate(model, x) for `penultimate` (tail = the last `blocks` blocks:
    SqueezeNet's Fire modules, 1-8, default 2; ResNet's layers, 1-4, default 1; AlexNet and VGG: the fully
    connected layers)."""
    flat = nn.Flatten(1)
    if isinstance(model, Ensemble):
        if layer != "penultimate":
            raise PipelineError(
                "an ensemble of fine-tuned networks has one layer, its joined embedding: use penultimate"
            )
        return model.frozen, model.tails
    if isinstance(model, (tvm.AlexNet, tvm.VGG)):
        frozen = nn.Sequential(model.features, model.avgpool, flat)
        return frozen, (model.classifier if layer == "output" else model.classifier[:-1])
    if isinstance(model, tvm.SqueezeNet):
        if layer == "output":
            return model.features, nn.Sequential(model.classifier, flat)
        fires = [i for i, m in enumerate(model.features) if isinstance(m, tvm.squeezenet.Fire)]
        start = fires[-check_blocks(blocks or 2, len(fires))]
        return model.features[:start], nn.Sequential(*model.features[start:], pooling(model), flat)
    if isinstance(model, tvm.ResNet):
        m = model
        stem, layers = [m.conv1, m.bn1, m.relu, m.maxpool], [m.layer1, m.layer2, m.layer3, m.layer4]
        if layer == "output":
            return nn.Sequential(*stem, *layers, m.avgpool, flat), m.fc
        cut = 4 - check_blocks(blocks or 1, 4)
        return nn.Sequential(*stem, *layers[:cut]), nn.Sequential(*layers[cut:], pooling(m), flat)
    raise PipelineError(f"no frozen/trainable split known for {type(model).__name__}")


def check_blocks(blocks: int, n: int) -> int:
    if not 1 <= blocks <= n:
        raise PipelineError(f"train_blocks must be between 1 and {n} for this model, got {blocks}")
    return blocks


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Equal parameters and buffers (the same module, or a frozen part copied unchanged)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class JoinedTails(nn.Module):
    """The tails of an ensemble over one frozen output: the concatenation of each tail's unit-length output."""

    def __init__(self, tails: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(tails)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.normalize(t(z).float(), dim=1) for t in self.members], dim=1)


class Ensemble(EmbeddingNetwork):
    """Networks fine-tuned from one backbone that share their frozen first layers (`finetune --members`): the
    frozen part runs once, and the embedding joins the members' (`JoinedTails`), so that the cosine similarity
    of two images is the mean of the members' cosines."""

    def __init__(self, frozen: nn.Module, tails: list[nn.Module]):
        super().__init__()
        self.frozen, self.tails = frozen, JoinedTails(tails)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tails(self.frozen(x))


def join_members(members: list[nn.Module], blocks: int | None) -> Ensemble:
    """The `Ensemble` of fine-tuned `members` (`blocks`: the trained blocks). Members fine-tuned from the same
    weights share their frozen part; members that do not (random initialisations, `--weights none`) each run
    their whole network."""
    parts = [split_model(model, "penultimate", blocks) for model in members]
    if all(same_state(parts[0][0], f) for f, _ in parts):
        return Ensemble(parts[0][0], [t for _, t in parts])
    return Ensemble(nn.Identity(), [nn.Sequential(f, t) for f, t in parts])
