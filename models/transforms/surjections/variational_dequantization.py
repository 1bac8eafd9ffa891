"""Variational dequantization (Ho et al. 2019, Flow++ §3.2), as a surjection.

Integer images x in {0, ..., K-1}^D (K = 2^n_bits) map to y = (x + u) / K with the noise
u ~ q(u | x) drawn from a conditional flow:

    eps ~ N(0, I),   u = g(eps; c(x)),   c = context_net(x / K - 0.5)
    log q(u | x) = log N(eps; 0, I) - log|det dg/deps|

where g is a list of transforms that take the context (``flow``; its last layer maps into
(0, 1), e.g. a Sigmoid).  The layer's likelihood contribution is

    ldj = -D log K - log q(u | x)

so E_q[log p_y(y) + ldj] <= log P(x) (the variational bound; uniform dequantization is
the special case q = 1).  log (1/S) sum_s exp(log p_y(y_s) + ldj_s) over S samples is
the importance-weighted bound (``Flow.log_prob_iw``).  Inverse: x = floor(K y).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.core.compose import Compose
from models.core.transform import Transform, compute_dtype
from models.transforms.surjections.conditional_noise import push_noise


class VariationalDequantization(Transform):
    bijective = False
    stochastic_forward = True
    exact_ldj = False

    def __init__(self, flow: list[Transform], context_net: nn.Module, num_bits: int = 8):
        super().__init__()
        self.flow = Compose(flow)
        self.context_net = context_net
        self.num_bins = 2 ** int(num_bits)

    def sample_noise(self, x: torch.Tensor):
        """(u, log q(u | x), auxiliary losses of the noise flow) for integer images x."""
        x = x.to(torch.get_default_dtype())
        context = self.context_net(x / self.num_bins - 0.5)
        return push_noise(self.flow, torch.randn_like(x), context)

    def forward(self, x, context=None):
        z, ldj, _ = self.forward_aux(x, context)
        return z, ldj

    def forward_aux(self, x, context=None):
        x = x.to(torch.get_default_dtype())
        u, log_q, aux = self.sample_noise(x)
        v = x + u.to(x.dtype)
        # keep x + u inside its bin despite float rounding (sigmoid can round to 0 or 1)
        v = torch.minimum(torch.maximum(v, x), torch.nextafter(x + 1, x))
        ldj = -x[0].numel() * math.log(self.num_bins) - log_q.to(compute_dtype(x))
        return v / self.num_bins, ldj, {f"flow.{k}": a for k, a in aux.items()}

    def inverse(self, z, context=None, *, temperature=1.0):
        return torch.floor(z * self.num_bins).clamp(0, self.num_bins - 1)
