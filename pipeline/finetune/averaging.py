"""The moving average of the trained weights (`FinetuneConfig.ema`): updated after every optimisation step, swapped
into the model for validation, the best epoch and the final weights, and saved in the checkpoint (so a resumed
run averages exactly as an uninterrupted one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """average = decay x average + (1 - decay) x weights, per trained parameter (float32, by name), started from
    the weights after the first step; `decay` 0: no average (`swapped_into` changes nothing)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module) -> None:
        if not self.decay:
            return
        self.state = {} if self.state is None else self.state
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if name not in self.state:
                    self.state[name] = p.detach().float().clone()
                else:
                    self.state[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """Inside, `model` holds the average of its trained weights; its own weights again after."""
        if not self.state:
            yield
            return
        params = dict(model.named_parameters())
        kept = {name: params[name].detach().clone() for name in self.state}
        with torch.no_grad():
            for name, v in self.state.items():
                params[name].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, v in kept.items():
                    params[name].copy_(v)
