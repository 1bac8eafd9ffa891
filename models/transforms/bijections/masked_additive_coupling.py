"""NICE additive coupling with a binary mask (Dinh, Krueger & Bengio 2015, §3.2).

    z = b * x + (1 - b) * (x + m(b * x))          log|det dz/dx| = 0
    x = b * z + (1 - b) * (z - m(b * z))

``net`` maps a tensor shaped like ``x`` to one of the same shape; only its (1 - b) part
is used.  Volume preserving: NICE pairs it with a diagonal scaling layer
(:mod:`models.transforms.bijections.diagonal_scaling`).  Works for (B, D) and (B, C, H, W).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, zeros_ldj


class MaskedAdditiveCoupling(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, net: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mask", mask.float())

    def _shift(self, x_masked, context=None):
        h = self.net(x_masked) if context is None else self.net(x_masked, context)
        return h.to(x_masked.dtype) * (1 - self.mask.to(x_masked.dtype))

    def forward(self, x, context=None):
        return x + self._shift(x * self.mask.to(x.dtype), context), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        return z - self._shift(z * self.mask.to(z.dtype), context)
