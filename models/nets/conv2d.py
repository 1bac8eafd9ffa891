"""A stride-1 2-D convolution whose first derivatives are differentiated in closed form.

    y = W * x + b                    (cross-correlation, stride 1, zero padding p)
    dL/dx = W^T * gO                 (the input gradient: a transposed convolution of gO)
    dL/dW = x (*) gO                 (the weight gradient: x correlated with gO)

Residual Flows' Neumann gradient (arXiv:1906.02735, §3.1) differentiates vector-Jacobian
products of g again, so every convolution's *first* derivative is itself differentiated:
with gI = W^T * gO and an incoming ggI,

    d<ggI, gI>/dgO = W * ggI         (one convolution)
    d<ggI, gI>/dW  = ggI (*) gO      (one weight gradient: ``convolution_backward``)

and with gW = x (*) gO and an incoming ggW,

    d<ggW, gW>/dgO = ggW * x         (one convolution)
    d<ggW, gW>/dx  = ggW^T * gO      (one input gradient).

Autograd's own double backward of a convolution computes the weight term as a convolution
of the transposed tensors (C, N, H, W): a copy of each and a batch of C "images", 3-25x
slower than the weight-gradient kernel here (CPU, batch 16, 512 channels); these functions
call the kernels above instead.  A first derivative computes only the gradients the
backward pass will use (``torch.autograd.grad(..., inputs=[x])``, a vector-Jacobian
product, skips the weight gradient).  A third order (a graph built through the second)
differentiates the formulas with autograd, so every order is right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.nets.formula_grad import differentiate, will_use
from models.nets.narrow_conv2d import narrow_output_conv2d, use_narrow_output

_conv_backward = torch.ops.aten.convolution_backward


def _grads(grad_out, x, weight, padding: int, mask: list[bool]):
    """aten's (dL/dx, dL/dW) of a stride-1 convolution, the ones in ``mask`` (no bias)."""
    gi, gw, _ = _conv_backward(grad_out, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                               [mask[0], mask[1], False])
    return gi, gw


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        need_x, need_w, need_b = will_use(ctx)[:3]
        if torch.is_grad_enabled():  # create_graph: first derivatives that can be differentiated
            gi = _InputGradFn.apply(grad_out, x, weight, p) if need_x else None
            gw = _WeightGradFn.apply(grad_out, x, weight, p) if need_w else None
        else:
            gi, gw = _grads(grad_out, x, weight, p, [need_x, need_w]) if (need_x or need_w) else (None, None)
        gb = grad_out.sum((0, 2, 3)) if need_b else None
        return gi, gw, gb, None


class _InputGradFn(torch.autograd.Function):
    """(gO, W) -> W^T * gO; ``x`` gives the shape and layout only."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, padding):
        ctx.save_for_backward(grad_out, weight)
        ctx.padding = padding
        return _grads(grad_out, x, weight, padding, [True, False])[0]

    @staticmethod
    def backward(ctx, ggi):
        grad_out, weight = ctx.saved_tensors
        p = ctx.padding
        need_go, _, need_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a third order: differentiate the formula with autograd
            d_go, d_w = differentiate(lambda go, w: F.conv_transpose2d(go, w, padding=p), (grad_out, weight), ggi)
            return d_go, None, d_w, None
        d_go = F.conv2d(ggi, weight, padding=p) if need_go else None
        d_w = _grads(grad_out, ggi, weight, p, [False, True])[1] if need_w else None
        return d_go, None, d_w, None


class _WeightGradFn(torch.autograd.Function):
    """(gO, x) -> x (*) gO; ``weight`` gives the shape and layout only."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, padding):
        ctx.save_for_backward(grad_out, x, weight)
        ctx.padding = padding
        return _grads(grad_out, x, weight, padding, [False, True])[1]

    @staticmethod
    def backward(ctx, ggw):
        grad_out, x, weight = ctx.saved_tensors
        p = ctx.padding
        need_go, need_x = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a third order: differentiate the formula with autograd
            def weight_grad(go, inp):  # x (*) gO as a differentiable function of gO and x
                w = weight.detach().requires_grad_(True)
                return torch.autograd.grad(F.conv2d(inp, w, padding=p), w, go, create_graph=True)[0]
            d_go, d_x = differentiate(weight_grad, (grad_out, x), ggw)
            return d_go, d_x, None, None
        d_go = F.conv2d(x, ggw, padding=p) if need_go else None
        d_x = _grads(grad_out, x, ggw, p, [True, False])[0] if need_x else None
        return d_go, d_x, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=padding) (stride 1, no dilation, one group), with the
    closed-form second derivatives of the module docstring.  Under autocast it is plain
    F.conv2d: its backward would meet the autocast dtype (callers here run with autocast off).
    Without autograd, a wide NHWC batch to a few output channels on the CPU goes through one
    GEMM (``models.nets.narrow_conv2d``: the same numbers, faster than oneDNN there)."""
    if torch.is_autocast_enabled(x.device.type):
        return F.conv2d(x, weight, bias, padding=padding)
    if not torch.is_grad_enabled() and use_narrow_output(x, weight, padding):  # sampling: models.nets.narrow_conv2d
        return narrow_output_conv2d(x, weight, bias)
    return _Conv2dFn.apply(x, weight, bias, padding)
