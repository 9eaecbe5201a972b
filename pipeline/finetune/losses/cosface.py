"""A large-margin cosine loss over the training identities (CosFace)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.finetune.config import FinetuneConfig


class CosFaceLoss(nn.Module):
    """Large-margin cosine loss (Wang et al. 2018) over training identities: softmax of s * (cos - m at the
    true class). The class weights are training-only; the embedding is what the backbone outputs."""

    per_identity = False
    """Batches are a shuffle of the training images."""

    def __init__(self, dim: int, n_classes: int, scale: float = 30.0, margin: float = 0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, *, dim: int, n_classes: int, **_) -> CosFaceLoss:
        return cls(dim, n_classes, cfg.scale, cfg.margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight, dim=1))
        logits = self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]))
        return F.cross_entropy(logits, labels)
