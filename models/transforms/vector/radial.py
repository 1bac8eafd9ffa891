"""Radial flow (Rezende & Mohamed 2015, §4.1).

    f(z) = z + beta * h(alpha, r) (z - z0),   r = |z - z0|,   h = 1 / (alpha + r)
    log|det df/dz| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r),   h' = -1/(alpha + r)^2

Invertibility constraint (paper, appendix A): beta >= -alpha.  Parameterised as
alpha = softplus(a) > 0 and beta = -alpha + softplus(c), so it always holds and both
factors of the determinant are positive.

The paper states no analytic inverse; in fact this one has a closed form: f keeps the
direction of z - z0 and maps radius r to r' = r (1 + beta / (alpha + r)), so r is the
positive root of r^2 + (alpha + beta - r') r - alpha r' = 0 and
z = z0 + (y - z0) r / r'.  Hence ``exact_inverse`` stays True here.
With ``context_features`` (z0, a, c) are amortised: static + Linear(context).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.transform import Transform, compute_dtype


class RadialFlow(Transform):
    def __init__(self, dim: int, context_features: int | None = None):
        super().__init__()
        self.dim = dim
        self.z0 = nn.Parameter(0.5 * torch.randn(dim))
        self.a = nn.Parameter(torch.zeros(1))
        self.c = nn.Parameter(torch.ones(1))  # beta = softplus(1) - softplus(0) > 0: not the identity
        self.amortizer = nn.Linear(context_features, dim + 2) if context_features else None
        if self.amortizer is not None:
            nn.init.normal_(self.amortizer.weight, std=0.01)
            nn.init.zeros_(self.amortizer.bias)

    def params(self, batch: int, context=None, dtype=torch.float32):
        z0 = self.z0.to(dtype).expand(batch, -1)
        a, c = self.a.to(dtype).expand(batch), self.c.to(dtype).expand(batch)
        if self.amortizer is not None and context is not None:
            h = self.amortizer(context).to(dtype)
            z0, a, c = z0 + h[:, : self.dim], a + h[:, -2], c + h[:, -1]
        alpha = F.softplus(a)
        beta = -alpha + F.softplus(c)
        return z0, alpha, beta

    def forward(self, x, context=None):
        dtype = compute_dtype(x)
        z0, alpha, beta = self.params(x.shape[0], context, dtype)
        diff = x.to(dtype) - z0
        r = diff.norm(dim=1)
        h = 1.0 / (alpha + r)
        bh = beta * h
        y = x.to(dtype) + bh[:, None] * diff
        ldj = (self.dim - 1) * torch.log1p(bh) + torch.log1p(bh - beta * h * h * r)
        return y.to(x.dtype), ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        dtype = compute_dtype(z)
        z0, alpha, beta = self.params(z.shape[0], context, dtype)
        diff = z.to(dtype) - z0
        r_out = diff.norm(dim=1)
        q = alpha + beta - r_out
        r = 0.5 * (-q + torch.sqrt(q * q + 4 * alpha * r_out))
        ratio = torch.where(r_out > 0, r / r_out.clamp_min(1e-30), torch.zeros_like(r_out))
        return (z0 + diff * ratio[:, None]).to(z.dtype)
