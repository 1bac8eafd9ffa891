"""Divergence (trace of df/dz) of a batch of vector fields, and the squared Jacobian norm
that comes with it at no extra cost (RNODE's Jacobian Frobenius penalty).

Hutchinson (FFJORD §2.2): for noise e with E[e e^T] = I (Rademacher or Gaussian),

    tr(J) = E[e^T J e]          ||J||_F^2 / D = E[ mean_i (e^T J)_i^2 ]

one vector-Jacobian product per evaluation; the noise is drawn once per ODE solve and
held fixed during it (so the solver integrates one smooth ODE).

Exact: the D rows of J by D vector-Jacobian products (for small inputs: 2-D toys, tests).
Both return ``(trace, sq_jac_norm)``, each of shape (B,), with
``sq_jac_norm = ||J||_F^2 / D`` (exactly, or its unbiased estimate).
"""
from __future__ import annotations

import torch

NOISE_TYPES = ("rademacher", "gaussian")
TRACE_TYPES = ("hutchinson", "exact")


def sample_noise(kind: str, like: torch.Tensor) -> torch.Tensor:
    """Noise with E[e e^T] = I, shaped like ``like``."""
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"unknown noise {kind!r}; use one of {NOISE_TYPES}")


def hutchinson_trace(f: torch.Tensor, z: torch.Tensor, e: torch.Tensor, create_graph: bool):
    """(e^T J e, mean((e^T J)^2)) with J = df/dz, per example."""
    e_jac = torch.autograd.grad(f, z, e, create_graph=create_graph)[0]
    dims = tuple(range(1, z.dim()))  # (a reshape to (B, D) would copy an NHWC state)
    return (e_jac * e).sum(dim=dims), e_jac.pow(2).mean(dim=dims)


def jacobian(f: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Per-example Jacobian (B, D, D), row i = d f_i / dz, by D vector-Jacobian products."""
    b = z.shape[0]
    f_flat = f.reshape(b, -1)
    rows = [torch.autograd.grad(f_flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0].reshape(b, -1)
            for i in range(f_flat.shape[1])]
    return torch.stack(rows, dim=1)


def exact_trace(f: torch.Tensor, z: torch.Tensor, create_graph: bool):
    """(tr J, ||J||_F^2 / D) per example, exactly."""
    jac = jacobian(f, z, create_graph)
    d = jac.shape[1]
    return jac.diagonal(dim1=1, dim2=2).sum(dim=1), jac.pow(2).sum(dim=(1, 2)) / d
