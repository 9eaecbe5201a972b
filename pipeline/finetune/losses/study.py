"""The study's Siamese loss: binary cross entropy of the normalised Euclidean distance of a pair."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.finetune.config import FinetuneConfig


class StudyLoss(nn.Module):
    """The study's Siamese loss. dissimilarity = (||a - b|| + eps) / (running max + eps), where the running
    maximum is the largest distance (+ eps) seen so far, this batch included, so it lies in (0, 1); binary
    cross entropy against the target 0 = same person, 1 = different. The running maximum is a buffer
    (saved in checkpoints) and never receives gradients.

    `before_batch` (not the study's): divide by the maximum of the batches before this one and clip at
    1 - eps / (that maximum + eps), so that a same-person pair setting a new maximum is not pulled with a
    gradient of 1/eps (the first batch, with no maximum before it, takes its own)."""

    per_identity = False
    """Batches are the study's pairs (drawn by its trainer)."""

    def __init__(self, eps: float = 0.01, before_batch: bool = False):
        super().__init__()
        self.eps = eps
        self.before_batch = before_batch
        self.register_buffer("running_max", torch.zeros(()))

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, **_) -> StudyLoss:
        return cls(cfg.eps, before_batch=cfg.study_max == "before-batch")

    def dissimilarity(self, a: torch.Tensor, b: torch.Tensor, update: bool = True) -> torch.Tensor:
        dist = torch.linalg.vector_norm(a.float() - b.float(), dim=1) + self.eps
        before = self.running_max
        if update:
            self.running_max = torch.maximum(self.running_max, dist.detach().max())
        if self.before_batch and before > 0:
            scale = before + self.eps
            return (dist / scale).clamp(max=1 - self.eps / scale)
        return dist / (self.running_max + self.eps)

    def forward(self, a: torch.Tensor, b: torch.Tensor, different: torch.Tensor) -> torch.Tensor:
        # binary cross entropy is refused under CUDA autocast: compute it (and the distances) in float32
        with torch.autocast(a.device.type, enabled=False):
            return F.binary_cross_entropy(self.dissimilarity(a, b), different.float())
