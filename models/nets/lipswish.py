"""LipSwish (Residual Flows §4.2, arXiv:1906.02735), with a backward that keeps one tensor.

    f(x) = x sigmoid(b x) / 1.1 = silu(b x) / (1.1 b),    b = softplus(beta) > 0

Swish's derivative is bounded by about 1.0998 for any slope, so dividing by 1.1 makes f
1-Lipschitz; beta (init 0.5, one scalar per activation) is learned.

Memory.  Written as plain tensor ops, autograd keeps x *and* sigmoid(b x) of every
activation for the backward pass; in a Residual Flow those are the largest tensors of
the step (hidden channels x full resolution, two LipSwish per block).  ``_LipSwishFn``
keeps x alone and recomputes in the backward pass:

    df/dx = silu'(b x) / 1.1                                    (one fused silu_backward)
    sum dL/df * df/db = [sum x (dL/df silu'(b x))] / (1.1 b) - [sum dL/df silu(b x)] / (1.1 b^2)

Residual Flows' nets do not call this layer's forward: they fold b into the layers around
each activation (``models.nets.resflow_nets.lipswish_chain``); the module holds beta.

A backward that itself builds a graph (``create_graph``: the power-series log-det's
vector-Jacobian products, differentiated again by the Neumann gradient) recomputes f from
the kept x with differentiable ops and differentiates that, so every derivative order
matches the plain formula.  Without autograd (sampling) f is one in-place silu.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _lipswish(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x * b) / 1.1


def _lipswish_fused(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same f as silu(b x) / (1.1 b): one fused kernel on one new buffer (no autograd)."""
    return F.silu(x * b, inplace=True).div_(1.1 * b)


class _LipSwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b):
        ctx.save_for_backward(x, b)
        return _lipswish_fused(x, b)

    @staticmethod
    def backward(ctx, grad):
        x, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            with torch.enable_grad():
                return torch.autograd.grad(_lipswish(x, b), (x, b), grad, create_graph=True)
        u = x * b
        gu = torch.ops.aten.silu_backward(grad, u)  # dL/df * silu'(b x)
        grad_b = None
        if ctx.needs_input_grad[1]:
            s_x = torch.dot(x.reshape(-1), gu.reshape(-1))
            s_f = torch.dot(grad.reshape(-1), F.silu(u, inplace=True).reshape(-1))
            grad_b = (s_x / (1.1 * b) - s_f / (1.1 * b * b)).reshape(b.shape)
        return gu.div_(1.1), grad_b


class LipSwish(nn.Module):
    """f(x) = x * sigmoid(softplus(beta) x) / 1.1 (see the module docstring)."""

    def __init__(self, beta: float = 0.5):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([float(beta)]))

    def slope(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """b = softplus(beta), shape (1,)."""
        return F.softplus(self.beta).to(dtype)

    def forward(self, x):
        b = self.slope(x.dtype)
        return _lipswish_fused(x, b) if not torch.is_grad_enabled() else _LipSwishFn.apply(x, b)
