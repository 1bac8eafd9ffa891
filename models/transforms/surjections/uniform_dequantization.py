"""Uniform dequantization (Theis et al. 2016; Glow), as a surjection.

Integer images x in {0, ..., K-1}^D (K = 2^n_bits) map to y = (x + u) / K with
u ~ U(0, 1)^D (kept strictly inside the bin despite float rounding).  Since q(u|x) = 1, the likelihood contribution is the bin volume

    ldj = -D log K - log q(u|x) = -D log K

so log p(x) >= E_u[ log p_y(y) ] - D log K: a lower bound on the discrete
log-likelihood.  Inverse: x = floor(K y) (NaN stays NaN, so bad samples are counted,
not hidden).
"""
from __future__ import annotations

import math

import torch

from models.core.transform import Transform


class UniformDequantization(Transform):
    bijective = False
    stochastic_forward = True
    exact_ldj = False  # a bound on log P(x), tight only in expectation

    def __init__(self, num_bits: int = 8):
        super().__init__()
        self.num_bins = 2 ** int(num_bits)

    def forward(self, x, context=None):
        x = x.to(torch.get_default_dtype())
        v = x + torch.rand(x.shape, device=x.device, dtype=x.dtype)
        # x + u can round up to x + 1 in float32 when u is within an ulp of 1: keep it in its bin
        v = torch.minimum(v, torch.nextafter(x + 1, x))
        y = v / self.num_bins  # division by a power of two is exact, so floor(K y) == x
        ldj = torch.full((x.shape[0],), -x[0].numel() * math.log(self.num_bins), device=x.device)
        return y, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        return torch.floor(z * self.num_bins).clamp(0, self.num_bins - 1)
