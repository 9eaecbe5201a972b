"""A logistic loss on the cosines of every pair of a batch of P identities x K images."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.finetune.config import FinetuneConfig


class BatchPairLoss(nn.Module):
    """Every pair of a batch (P identities x K images): logistic loss on scale * (cosine - threshold), the
    mean over same-person pairs plus the mean over different-person pairs, so both count equally and the
    hardest pairs weigh most. The threshold is learnt; it starts between the first batch's two means."""

    per_identity = True
    """Batches hold K images of each of P identities (people with one image train only with `singletons`)."""

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale
        self.threshold = nn.Parameter(torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, **_) -> BatchPairLoss:
        return cls(cfg.scale)

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
