"""Layers acting on the two channel halves of a coupling split (Flow++).

SwapHalves (the official ``TupleFlip``):  z = [x_b, x_a],  log|det| = 0.
Halfwise(t_a, t_b): z = [t_a(x_a), t_b(x_b)],  log|det| = ldj_a + ldj_b.
    Flow++'s ``Pointwise`` keeps one invertible 1x1 conv per half; ``Halfwise`` of two
    ``InvertibleConv1x1`` is exactly that (a block-diagonal 1x1 conv, 2 (C/2)^2 weights).
"""
from __future__ import annotations

import torch

from models.core.transform import Transform, zeros_ldj


class SwapHalves(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def forward(self, x, context=None):
        if x.shape[1] % 2:
            raise ValueError(f"SwapHalves needs an even number of channels, got {x.shape[1]}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([b, a], dim=1), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        a, b = z.chunk(2, dim=1)
        return torch.cat([b, a], dim=1)


class Halfwise(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, first: Transform, second: Transform):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x, context=None):
        a, b = x.chunk(2, dim=1)
        za, la = self.first(a, context)
        zb, lb = self.second(b, context)
        return torch.cat([za, zb], dim=1), la + lb

    def inverse(self, z, context=None, *, temperature=1.0):
        a, b = z.chunk(2, dim=1)
        return torch.cat([self.first.inverse(a, context), self.second.inverse(b, context)], dim=1)
