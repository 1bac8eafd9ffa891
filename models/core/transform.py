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

Hooks live on the layers, with no-op defaults; a ``Flow`` calls them on every
``Transform`` among its modules (nested ones included), so a layer keeps its
behaviour in any family:

    forward_aux(x)           (z, ldj, aux): ``aux`` holds this call's auxiliary losses,
                             already weighted (e.g. RNODE's regularisers of a CNF)
    needs_data_init          class flag: the layer initialises from its first batch (ActNorm)
    data_init()              before that data-dependent forward (e.g. converge power iterations)
    after_optimizer_step()   after every optimizer step (e.g. spectral-norm power iterations)
    diagnostics()            {name: float} to log (NFE, series terms, fixed-point iterations)
    inverse_with_ldj(z)      (x, log|det dx/dz|): what ``Inverse`` needs; generic fallback here
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
    invertible_backprop: bool = False # opt-in: ``inverse`` rebuilds the input from the output exactly and
    #   cheaply (closed form, nothing but parameters and the random stream: no batch statistics), so
    #   train.activation_memory=invertible may drop its activations (models.core.activation_memory)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None, *, temperature: float = 1.0):
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    needs_data_init: bool = False     # initialises itself from the first batch it sees

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape (C, H, W) of the output for an input of shape ``in_shape``."""
        return tuple(in_shape)

    def input_shape(self, out_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The input shape whose output has shape ``out_shape`` (what ``Inverse`` needs);
        layers that change the shape override both."""
        return tuple(out_shape)

    # --- the forward with its auxiliary terms -------------------------------------------
    def forward_aux(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """``(z, ldj, aux)``: the forward and the auxiliary losses of this very call.

        Layers without auxiliary terms need not override it; layers with them override
        this and define ``forward`` as ``forward_aux`` without the dict."""
        z, ldj = self(x, context)
        return z, ldj, {}

    def inverse_with_ldj(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """``(x, log|det dx/dz|)`` for a bijection: x = inverse(z), ldj = -forward's ldj at x.
        Generic (one inverse and one forward); layers with a closed form override it."""
        x = self.inverse(z, context)
        _, ldj = self(x, context)
        return x, -ldj

    # --- hooks (no-ops by default; ``Flow`` calls them on every Transform module) ---------
    def data_init(self) -> None:
        """Called once before the data-dependent initialisation forward pass."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step."""

    @classmethod
    def after_optimizer_step_all(cls, layers: list["Transform"]) -> None:
        """``after_optimizer_step`` of all of a model's layers of this class at once (the model's
        hook calls this once per class); a class overrides it to batch the work across its
        layers, e.g. one host read for all of them."""
        for t in layers:
            t.after_optimizer_step()

    def diagnostics(self) -> dict[str, float]:
        """Scalars about the last call(s) to log; names are prefixed with the layer's path."""
        return {}

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
