"""The one contract every layer of every flow family implements.

A :class:`Transform` maps data ``x`` towards the latent ``z`` and returns its
log-likelihood contribution ``ldj`` (shape ``(B,)``, float32, or float64 for float64 inputs):

    log p(x) >= log p(z) + ldj        (equality for exact bijections)

For a bijection ``ldj = log|det dz/dx|``; for a surjection (dequantization,
argmax, factor-out) it is the layer's likelihood term, e.g. ``-log q(u|x)`` or
``log p(x2|x1)``.  ``inverse`` maps back, sampling where the layer is stochastic
in that direction (``temperature`` scales any noise drawn).

Class flags say what a layer is, and the shared tests honour them.

Layers that factor out part of their input (multi-scale split) set
``factors_out = True`` and also implement ``split``/``merge`` so that a model's
``encode``/``decode`` keep the split-off latents and reconstruct exactly.
"""
from __future__ import annotations

import torch
from torch import nn


class Transform(nn.Module):
    """Base class: ``forward(x) -> (z, ldj)``, ``inverse(z) -> x``."""

    bijective: bool = True            # one-to-one on its domain
    stochastic_forward: bool = False  # forward draws noise (dequantization, argmax)
    stochastic_inverse: bool = False  # inverse draws noise (factor-out prior)
    exact_ldj: bool = True            # ldj is exact, not an estimate or a bound
    exact_inverse: bool = True        # inverse is closed form (no iteration)
    discrete: bool = False            # maps integers to integers
    factors_out: bool = False         # implements split()/merge()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None, *, temperature: float = 1.0):
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape (C, H, W) of the output for an input of shape ``in_shape``."""
        return tuple(in_shape)

    # --- factor-out layers only -------------------------------------------------
    def split(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Return ``(z_kept, ldj, latent)`` where ``latent`` lets ``merge`` rebuild ``x``."""
        raise NotImplementedError

    def merge(self, z: torch.Tensor, latent: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first, in at least float32: shape (B,)."""
    return x.to(compute_dtype(x)).reshape(x.shape[0], -1).sum(dim=1)


def zeros_ldj(x: torch.Tensor) -> torch.Tensor:
    """A float32 log-det of zeros, one per example."""
    return torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: the dtype for log-dets and invertible arithmetic under autocast
    (float64 inputs, as in the tests, stay float64)."""
    return torch.promote_types(x.dtype, torch.float32)
