"""Centre integer pixels: z = x - offset (IDF's ``Normalize`` on the integer grid), ldj = 0.

IDF models x in {0..2^n - 1} as integers, with no dequantization: the official code
feeds (x - 2^(n-1)) / 2^n, i.e. the centred integers x - 2^(n-1) on a grid of 1/2^n,
and measures every latent on that same grid, so log p(x) is the exact discrete
log-probability.  uint8 input becomes the default float dtype (integers stay exact).

The priors are distributions over all integers, so a sampled latent can land outside the
pixel range; ``inverse`` clamps to {0..2 offset - 1}, i.e. folds the tails into the edge
values (as the codec's edge bins do).  Real images are inside the range, so encode /
decode stays exact.
"""
from __future__ import annotations

import torch

from models.core.transform import Transform, zeros_ldj


class IntegerShift(Transform):
    discrete = True

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset

    def forward(self, x, context=None):
        if not torch.is_floating_point(x):
            x = x.to(torch.get_default_dtype())
        return x - self.offset, zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        return (z + self.offset).clamp(0, 2 * self.offset - 1)
