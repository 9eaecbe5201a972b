"""Training losses: the study's normalised-distance cross entropy and a large-margin cosine (CosFace) loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class StudyLoss(nn.Module):
    """The study's Siamese loss. dissimilarity = (||a - b|| + eps) / (running max + eps), where the running
    maximum is the largest distance (+ eps) seen so far, this batch included, so it lies in (0, 1); binary
    cross entropy against the target 0 = same person, 1 = different. The running maximum is a buffer
    (saved in checkpoints) and never receives gradients."""

    def __init__(self, eps: float = 0.01):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_max", torch.zeros(()))

    def dissimilarity(self, a: torch.Tensor, b: torch.Tensor, update: bool = True) -> torch.Tensor:
        dist = torch.linalg.vector_norm(a.float() - b.float(), dim=1) + self.eps
        if update:
            self.running_max = torch.maximum(self.running_max, dist.detach().max())
        return dist / (self.running_max + self.eps)

    def forward(self, a: torch.Tensor, b: torch.Tensor, different: torch.Tensor) -> torch.Tensor:
        # binary cross entropy is refused under CUDA autocast: compute it (and the distances) in float32
        with torch.autocast(a.device.type, enabled=False):
            return F.binary_cross_entropy(self.dissimilarity(a, b), different.float())


class CosFaceLoss(nn.Module):
    """Large-margin cosine loss (Wang et al. 2018) over training identities: softmax of s * (cos - m at the
    true class). The class weights are training-only; the embedding is what the backbone outputs."""

    def __init__(self, dim: int, n_classes: int, scale: float = 30.0, margin: float = 0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight, dim=1))
        logits = self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]))
        return F.cross_entropy(logits, labels)


class BatchPairLoss(nn.Module):
    """Every pair of a batch (P identities x K images): logistic loss on scale * (cosine - threshold), the
    mean over same-person pairs plus the mean over different-person pairs, so both count equally and the
    hardest pairs weigh most. The threshold is learnt; it starts between the first batch's two means."""

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale
        self.threshold = nn.Parameter(torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        e = F.normalize(embeddings.float(), dim=1)
        i, j = torch.triu_indices(len(e), len(e), 1, device=e.device)
        cos = (e[i] * e[j]).sum(1)
        same = labels[i] == labels[j]
        if not same.any() or same.all():
            raise ValueError("a batch needs same-person and different-person pairs")
        if not self.started:
            with torch.no_grad():
                self.threshold.fill_((cos[same].mean() + cos[~same].mean()).item() / 2)
                self.started.fill_(True)
        logits = self.scale * (cos - self.threshold)
        return F.softplus(-logits[same]).mean() + F.softplus(logits[~same]).mean()
