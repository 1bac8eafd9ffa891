"""silu(u) = u sigmoid(u) with a closed-form second derivative (for Residual Flows' power series).

With s = sigmoid(u):

    silu'(u)  = s (1 + u (1 - s))                           (aten's fused silu_backward)
    silu''(u) = s (1 - s) (2 + u (1 - 2 s))

The Neumann gradient of Residual Flows (arXiv:1906.02735, §3.1) differentiates a
vector-Jacobian product of g again: for every activation the backward of
grad -> grad silu'(u) is needed, i.e.

    d/d grad = gg silu'(u)               (one silu_backward)
    d/du     = gg grad silu''(u)         (sigmoid, a product, sigmoid_backward, addcmul and
                                          two in-place passes)

Autograd's silu, asked for a first derivative that can be differentiated, builds it from
six elementwise operations and differentiates those one by one: eighteen passes over the
activation (memory-bound, over the largest tensors of a Residual Flow step) for the first
and second orders together; these functions make eight (one silu_backward, then seven).
A third derivative (a graph built through the second) differentiates the formula for
silu' with autograd, so every order is right.
Both functions keep what autograd's silu keeps: u, and for the second order grad and u.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.nets.formula_grad import differentiate

_silu_backward = torch.ops.aten.silu_backward


class _SiluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return F.silu(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a first derivative that can be differentiated
            return _SiluGradFn.apply(grad, u)
        return _silu_backward(grad, u)


def _first_derivative(grad, u):
    """grad silu'(u) = grad s (1 + u (1 - s)) with differentiable operations."""
    s = torch.sigmoid(u)
    return grad * s * (1 + u * (1 - s))


class _SiluGradFn(torch.autograd.Function):
    """(grad, u) -> grad silu'(u), with the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx, grad, u):
        ctx.save_for_backward(grad, u)
        return _silu_backward(grad, u)

    @staticmethod
    def backward(ctx, gg):
        grad, u = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third order: differentiate the formula with autograd
            return differentiate(_first_derivative, (grad, u), gg)
        d_grad = _silu_backward(gg, u) if ctx.needs_input_grad[0] else None
        d_u = None
        if ctx.needs_input_grad[1]:
            s = torch.sigmoid(u)
            d_u = torch.ops.aten.sigmoid_backward(gg * grad, s)   # gg grad s (1 - s)
            d_u.mul_(torch.addcmul(u, u, s, value=-2.0).add_(2.0))  # * (2 + u (1 - 2 s))
        return d_grad, d_u


def silu(u: torch.Tensor) -> torch.Tensor:
    """silu(u) = u sigmoid(u); its second derivative in closed form (module docstring)."""
    return _SiluFn.apply(u)
