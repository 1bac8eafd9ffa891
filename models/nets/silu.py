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
and second orders together; this one makes eight (one silu_backward, then seven).
Built by ``formula_grad.twice_differentiable`` (every higher order by autograd over the formula).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.nets.formula_grad import twice_differentiable


def _first_derivative(grad, u):
    """grad silu'(u) = grad s (1 + u (1 - s)) with differentiable operations."""
    s = torch.sigmoid(u)
    return grad * s * (1 + u * (1 - s))


def _second_term(gg, grad, u):
    """gg grad silu''(u) = gg grad s (1 - s) (2 + u (1 - 2 s))."""
    s = torch.sigmoid(u)
    d_u = torch.ops.aten.sigmoid_backward(gg * grad, s)  # gg grad s (1 - s)
    return d_u.mul_(torch.addcmul(u, u, s, value=-2.0).add_(2.0))  # * (2 + u (1 - 2 s))


silu = twice_differentiable(F.silu, torch.ops.aten.silu_backward, _first_derivative, _second_term)
silu.__doc__ = "silu(u) = u sigmoid(u); its second derivative in closed form (module docstring)."
