"""Exponential moving average of weights (Polyak averaging).

    shadow <- decay * shadow + (1 - decay) * param        after every optimizer step

Buffers (ActNorm's init flag, power-iteration vectors) are copied, not averaged.
``swapped_in(model)`` evaluates or samples with the averaged weights and restores the
live ones afterwards; ``copy_to(model)`` loads them for good (sampling, evaluation).

Its format is its own: ``state_dict() -> {"decay": float, "shadow": {name: tensor}}`` and
``load_state_dict`` are the only way in and out (checkpoints store that dict as is).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from common.errors import FlowlabError


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    def to(self, device: torch.device | str) -> "EMA":
        """Move the averaged weights to ``device`` (in place); returns self."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self._params:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)
            else:
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (each in the model's own dtype)."""
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Take decay and averaged weights from ``state``; the weights must name exactly this
        EMA's entries (a one-line error otherwise) and stay on this EMA's device."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise FlowlabError(f"EMA weights do not match the model: {len(missing)} missing, {len(unexpected)} "
                               f"unexpected (e.g. {(missing or unexpected)[0]})")
        self.decay = state["decay"]
        self.shadow = {k: v.to(self.shadow[k].device).clone() for k, v in shadow.items()}
