"""Uniform dequantization (Theis et al. 2016; Glow), as a surjection.

Integer images x in {0, ..., K-1}^D (K = 2^n_bits) map to y = (x + u) / K with
u ~ U(0, 1)^D.  Since q(u|x) = 1, the likelihood contribution is the bin volume

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
        y = (x.to(torch.get_default_dtype()) + torch.rand(x.shape, device=x.device)) / self.num_bins
        ldj = torch.full((x.shape[0],), -x[0].numel() * math.log(self.num_bins), device=x.device)
        return y, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        return torch.floor(z * self.num_bins).clamp(0, self.num_bins - 1)
