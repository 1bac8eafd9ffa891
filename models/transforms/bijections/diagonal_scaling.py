"""NICE's diagonal scaling layer (Dinh, Krueger & Bengio 2015, §3.3).

    z = x * exp(s)            log|det dz/dx| = sum s

``s`` is a learned vector of the shape of one example (D,) or (C, H, W), initialised at 0.
It lets the otherwise volume-preserving NICE stack weight its dimensions.
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, compute_dtype


class DiagonalScaling(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, shape):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.log_scale = nn.Parameter(torch.zeros(shape))

    def forward(self, x, context=None):
        s = self.log_scale.to(compute_dtype(x))
        return (x.to(s.dtype) * torch.exp(s)).to(x.dtype), s.sum().expand(x.shape[0])

    def inverse(self, z, context=None, *, temperature=1.0):
        s = self.log_scale.to(compute_dtype(z))
        return (z.to(s.dtype) * torch.exp(-s)).to(z.dtype)
