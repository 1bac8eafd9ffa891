"""Exponential moving average of weights (Polyak averaging).

    shadow <- decay * shadow + (1 - decay) * param        after every optimizer step

Buffers (ActNorm's init flag, power-iteration vectors) are copied, not averaged.
``swapped_in(model)`` evaluates or samples with the averaged weights and restores the
live ones afterwards.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self._params:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)
            else:
                self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(live[k].dtype) for k, v in self.shadow.items()})
        try:
            yield model
        finally:
            model.load_state_dict(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
