"""Rounding with a straight-through gradient (IDF §3, Bengio et al. 2013).

    forward:  round(x)          (exact: the output is an integer-valued float)
    backward: d round(x) / dx := 1

``x + (round(x) - x).detach()`` would pass the same gradient but is not always exactly
an integer in floating point, so this is an autograd function.
"""
from __future__ import annotations

import torch


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward."""
    return _RoundStraightThrough.apply(x)
