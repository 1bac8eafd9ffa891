"""Shared arithmetic of affine autoregressive layers (MAF, IAF) on a MADE network.

    y = x * exp(-alpha) - mu * exp(-alpha)   i.e.   y = (x - mu) exp(-alpha)
    x = y * exp(alpha) + mu

where (mu, alpha) = MADE(v) depends autoregressively on ``v`` (the layer's input for
MAF's density direction, its output for IAF).  One MADE pass gives every (mu, alpha)
when ``v`` is known; recovering ``v`` from the other side takes D passes, each fixing
the coordinates of the next degree.
"""
from __future__ import annotations

import torch

from models.core.transform import compute_dtype


def made_params(made, v, context=None):
    """(mu, alpha) of shape (B, D) from one MADE pass, in at least float32."""
    h = made(v, context).to(compute_dtype(v))
    return h[:, 0], h[:, 1]


def normalize_one_pass(made, x, context=None):
    """y = (x - mu(x)) exp(-alpha(x)) and log|dy/dx| = -sum alpha: one pass."""
    mu, alpha = made_params(made, x, context)
    y = (x.to(mu.dtype) - mu) * torch.exp(-alpha)
    return y.to(x.dtype), -alpha.sum(dim=1)


def denormalize_sequential(made, y, context=None):
    """x with y = (x - mu(x)) exp(-alpha(x)): D passes in the MADE's ordering; also -sum alpha(x)."""
    x = torch.zeros_like(y)
    alpha = None
    for _ in range(made.dim):
        mu, alpha = made_params(made, x, context)
        x = (y.to(mu.dtype) * torch.exp(alpha) + mu).to(y.dtype)
    return x, -alpha.sum(dim=1)


def denormalize_one_pass(made, y, context=None):
    """x = y exp(alpha(y)) + mu(y): one pass, with log|dx/dy| = sum alpha(y)."""
    mu, alpha = made_params(made, y, context)
    return (y.to(mu.dtype) * torch.exp(alpha) + mu).to(y.dtype), alpha.sum(dim=1)


def normalize_sequential(made, x, context=None):
    """y with x = y exp(alpha(y)) + mu(y): D passes; also log|dy/dx| = -sum alpha(y)."""
    y = torch.zeros_like(x)
    alpha = None
    for _ in range(made.dim):
        mu, alpha = made_params(made, y, context)
        y = ((x.to(mu.dtype) - mu) * torch.exp(-alpha)).to(x.dtype)
    return y, -alpha.sum(dim=1)
