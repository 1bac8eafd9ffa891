"""Planar flow (Rezende & Mohamed 2015, §4.1).

    f(z) = z + u_hat * tanh(w . z + b)
    log|det df/dz| = log|1 + u_hat . psi(z)|,   psi(z) = (1 - tanh^2(w . z + b)) w

Invertibility constraint (paper, appendix A): f is invertible iff w . u_hat >= -1; we use
the paper's reparameterisation

    u_hat = u + (m(w . u) - w . u) w / |w|^2,   m(a) = -1 + softplus(a)

so w . u_hat = m(w . u) > -1 always, and 1 + u_hat . psi > 0 (positive Jacobian determinant).

There is no closed-form inverse (``exact_inverse = False``).  ``inverse`` solves it:
with a = w . z, the projection w . y = a + (w . u_hat) tanh(a + b) is increasing in a, so
a is found by bisection and z = y - u_hat tanh(a + b).

``forward`` is the map f.  Used as a density layer (data -> latent) it scores data in
closed form; used as a sampler (latent -> data, reverse KL, VAE posteriors) f pushes
samples forward with the same log-det.  With ``context_features`` the parameters are
amortised: (u, w, b) = static + Linear(context), one set per example.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.transform import Transform, compute_dtype
from models.transforms.vector.scalar_solve import solve_tanh_equation


class PlanarFlow(Transform):
    exact_inverse = False  # inverse by bisection

    def __init__(self, dim: int, context_features: int | None = None, init_scale: float = 0.1):
        super().__init__()
        self.dim = dim
        self.u = nn.Parameter(init_scale * torch.randn(dim))
        self.w = nn.Parameter(init_scale * torch.randn(dim))
        self.b = nn.Parameter(torch.zeros(1))
        self.amortizer = nn.Linear(context_features, 2 * dim + 1) if context_features else None
        if self.amortizer is not None:
            nn.init.normal_(self.amortizer.weight, std=0.01)
            nn.init.zeros_(self.amortizer.bias)

    def params(self, batch: int, context=None, dtype=torch.float32):
        """(u_hat, w, b) with shapes (B, D), (B, D), (B,)."""
        u, w, b = self.u.to(dtype), self.w.to(dtype), self.b.to(dtype)
        u, w, b = u.expand(batch, -1), w.expand(batch, -1), b.expand(batch)
        if self.amortizer is not None and context is not None:
            h = self.amortizer(context).to(dtype)
            u, w, b = u + h[:, : self.dim], w + h[:, self.dim: 2 * self.dim], b + h[:, -1]
        wu = (w * u).sum(dim=1, keepdim=True)
        u_hat = u + (-1 + F.softplus(wu) - wu) * w / (w * w).sum(dim=1, keepdim=True).clamp_min(1e-12)
        return u_hat, w, b

    def forward(self, x, context=None):
        dtype = compute_dtype(x)
        u, w, b = self.params(x.shape[0], context, dtype)
        a = (w * x.to(dtype)).sum(dim=1) + b
        t = torch.tanh(a)
        z = x.to(dtype) + u * t[:, None]
        det = 1 + (1 - t * t) * (u * w).sum(dim=1)
        return z.to(x.dtype), torch.log(det.abs())

    @torch.no_grad()
    def inverse(self, z, context=None, *, temperature=1.0, iters: int = 80):
        dtype = compute_dtype(z)
        u, w, b = self.params(z.shape[0], context, dtype)
        y = z.to(dtype)
        wu = (w * u).sum(dim=1)
        a = solve_tanh_equation((w * y).sum(dim=1), wu, torch.ones_like(wu), b, iters)
        return (y - u * torch.tanh(a + b)[:, None]).to(z.dtype)
