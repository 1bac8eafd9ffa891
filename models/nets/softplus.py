"""softplus(u) = log(1 + e^u) with a closed-form second derivative (for FFJORD's adjoint).

With s = sigmoid(u):

    softplus'(u)  = s                        (aten's fused softplus_backward)
    softplus''(u) = s (1 - s)

As torch's softplus (beta 1, threshold 20): softplus(u) = u, softplus'(u) = 1 and softplus''(u) = 0
for u > 20.

FFJORD's adjoint (arXiv:1810.01367, §2.2, with the adjoint of arXiv:1806.07366) differentiates
the Hutchinson trace's vector-Jacobian product e^T df/dz again in every evaluation of its
backward solve, so for every activation the backward of grad -> grad softplus'(u) is needed.
The first derivative with a graph computes s once (one softplus_backward) and keeps it:

    grad softplus'(u)  = grad s               (a product)
    d/d grad           = gg s                 (a product)
    d/du               = gg grad s (1 - s)    (a product and a sigmoid_backward)

Autograd's softplus makes nine passes over the activation for the first derivative with a graph
and its second (a cast, a comparison and four products among them); this one makes five (four
when grad itself needs no gradient), and only one of them evaluates an exponential.  Built by
``formula_grad.twice_differentiable`` (every higher order by autograd over the formula).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.formula_grad import twice_differentiable

_BETA, _THRESHOLD = 1.0, 20.0


def _first(grad, u):
    return torch.ops.aten.softplus_backward(grad, u, _BETA, _THRESHOLD)


def _first_derivative(grad, u):
    """grad softplus'(u) with differentiable operations (1 above the threshold, as torch)."""
    return grad * torch.where(u > _THRESHOLD, torch.ones_like(u), torch.sigmoid(u))


def _derivative(u):
    """softplus'(u) = s, 1 above the threshold (aten's softplus_backward of a gradient of ones)."""
    return torch.ops.aten.softplus_backward(torch.ones((), dtype=u.dtype, device=u.device).expand_as(u), u,
                                            _BETA, _THRESHOLD)


def _second_term(gg, grad, u, slope):
    """gg grad softplus''(u) = gg grad s (1 - s) with s = softplus'(u) (0 above the threshold, as torch)."""
    return torch.ops.aten.sigmoid_backward(gg * grad, slope)


softplus = twice_differentiable(F.softplus, _first, _first_derivative, _second_term, derivative=_derivative)
softplus.__doc__ = "log(1 + e^u) (torch's softplus); its second derivative in closed form (module docstring)."


class Softplus(nn.Module):
    """``nn.Softplus()`` (beta 1, threshold 20) with the closed-form second derivative of ``softplus``."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return softplus(u)
