"""The hooks a recipe answers for the one training loop (`pipeline.finetune.loop.Trainer`), with their defaults."""

from __future__ import annotations

import torch

from pipeline.finetune.config import FinetuneConfig


class RecipeHooks:
    """The base of `Trainer`: a recipe overrides `n_items` and `loss_of`, and the others where it differs."""

    cfg: FinetuneConfig

    def n_items(self) -> int:
        """Items (pairs or images) one epoch goes over."""
        raise NotImplementedError

    def loss_of(self, idx: torch.Tensor, phase: int) -> torch.Tensor:
        """The loss of the batch of items `idx` (under autocast)."""
        raise NotImplementedError

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """The item indices of each step of `epoch`: a shuffle seeded by (seed, epoch), cut into batches."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_items(), generator=g)
        return list(perm.split(self.cfg.batch_size))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimisation step `step` (constant unless a recipe schedules it)."""
        return self.cfg.lr

    def final_fields(self, state: dict) -> dict:
        """Fields the final checkpoint holds beside the weights `state` (a recipe's cohort, say)."""
        return {}

    def extra_state(self) -> dict:
        """The recipe's running state, saved in the checkpoint beside the loop's."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` saved (from the whole checkpoint)."""
