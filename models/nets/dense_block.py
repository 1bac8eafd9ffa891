"""A DenseNet block computed in one shared output buffer (the memory-efficient DenseNet of
Pleiss et al. 2017, arXiv:1707.06990, without its recomputation).

A dense block of L layers (``models.nets.densenet.DenseLayer``) computes

    x_0 = x,   a_d = ReLU(W1_d x_d + b1_d)            (1x1 convolution, c_d -> c_d channels)
               g_d = ReLU(W3_d * a_d + b3_d)           (3x3 convolution, c_d -> growth_d)
               x_{d+1} = [x_d, g_d]                    (channel concatenation)

and returns x_L.  Every x_d is a channel prefix of x_L, so the block writes x and each g_d
into their channel slices of one tensor of x_L's shape and reads x_d as a view of it.  The
layer-by-layer module keeps, for the backward, each concatenation x_d (autograd saves the
1x1 convolution's input), a_d and g_d, and copies every prefix once more into the next
concatenation; here the saved state is x_L (g_d is its slice; ReLU's derivative is g_d > 0)
and the a_d, about half of it (IDF's paper config: 1.39 GB -> 0.75 GB per step at batch 16),
and no concatenation is copied.  The backward walks the layers in reverse:

    dg_d = dx_L[:, slice d] * [g_d > 0]
    da_d = W3_d^T * dg_d * [a_d > 0]           (with the gradients of W3_d, b3_d)
    dx_L[:, :c_d] += W1_d^T da_d               (with the gradients of W1_d, b1_d)

through ``aten.convolution_backward``, and returns dx = dx_L[:, :c_0].  The same map and,
to float rounding, the same gradients as the module applied layer by layer (tested in
float64, NCHW and NHWC, under bf16 autocast).  Under autocast the convolutions run in the
autocast dtype and the buffer in the promotion of the input's dtype and it, as torch.cat of
the two would give.  Only first derivatives (IDF and the Discrete Flow nets need no more).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.nets.batch_map import is_nhwc


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_nhwc(x) else torch.contiguous_format


def _dense_forward(x: torch.Tensor, compute_dtype: torch.dtype, params, keep_hidden: bool):
    """x_L written into one buffer; with ``keep_hidden`` also the a_d (for the backward)."""
    n, c0, h, w = x.shape
    growths = [params[i + 2].shape[0] for i in range(0, len(params), 4)]
    out = torch.empty((n, c0 + sum(growths), h, w), dtype=torch.promote_types(x.dtype, compute_dtype),
                      device=x.device, memory_format=_layout(x))
    out[:, :c0].copy_(x)
    hidden, c = [], c0
    with torch.autocast(device_type=x.device.type, enabled=False):
        for i, growth in zip(range(0, len(params), 4), growths):
            w1, b1, w3, b3 = (p.to(compute_dtype) for p in params[i:i + 4])
            a = torch.relu_(F.conv2d(out[:, :c].to(compute_dtype), w1, b1))
            out[:, c:c + growth] = torch.relu_(F.conv2d(a, w3, b3, padding=w3.shape[-1] // 2))
            if keep_hidden:
                hidden.append(a)
            c += growth
    return out, growths, hidden


class _SharedBufferDenseBlock(torch.autograd.Function):
    """Inputs: x, the convolutions' dtype, then (W1, b1, W3, b3) of every layer."""

    @staticmethod
    def forward(ctx, x, compute_dtype, *params):
        out, growths, hidden = _dense_forward(x, compute_dtype, params, keep_hidden=True)
        ctx.compute_dtype, ctx.c0, ctx.growths, ctx.layout = compute_dtype, x.shape[1], growths, _layout(x)
        ctx.save_for_backward(out, *hidden, *params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, *rest = ctx.saved_tensors
        n_layers = len(ctx.growths)
        hidden, params = rest[:n_layers], rest[n_layers:]
        cd = ctx.compute_dtype
        grad = grad_out.to(out.dtype, copy=True, memory_format=ctx.layout)  # dx_L, accumulated in place
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        c = out.shape[1]
        with torch.autocast(device_type=out.device.type, enabled=False):
            for layer in reversed(range(n_layers)):
                growth, a = ctx.growths[layer], hidden[layer]
                c -= growth
                w1, b1, w3, b3 = (p.to(cd) for p in params[4 * layer:4 * layer + 4])
                needs = ctx.needs_input_grad[2 + 4 * layer:6 + 4 * layer]
                g = out[:, c:c + growth]
                dg = torch.ops.aten.threshold_backward(grad[:, c:c + growth], g, 0).to(cd)  # ReLU': [g > 0]
                k = w3.shape[-1] // 2
                da, dw3, db3 = torch.ops.aten.convolution_backward(
                    dg, a, w3, [growth], [1, 1], [k, k], [1, 1], False, [0, 0], 1, [True, needs[2], needs[3]])
                da = torch.ops.aten.threshold_backward(da, a, 0)
                dx, dw1, db1 = torch.ops.aten.convolution_backward(
                    da, out[:, :c].to(cd), w1, [c], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                    [True, needs[0], needs[1]])
                grad[:, :c] += dx
                for j, (d, p) in enumerate(zip((dw1, db1, dw3, db3), params[4 * layer:4 * layer + 4])):
                    param_grads[4 * layer + j] = None if d is None else d.to(p.dtype)
        return (grad[:, :ctx.c0], None, *param_grads)


def shared_buffer_dense_block(x: torch.Tensor, layers) -> torch.Tensor:
    """x_L of the dense layers ``layers`` (``DenseLayer``: ``conv1`` 1x1, ``conv3``) applied to x.
    Without autograd (sampling, evaluation) each a_d is freed as soon as g_d is written."""
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype = x.dtype
    params = [t for layer in layers for t in (layer.conv1.weight, layer.conv1.bias, layer.conv3.weight, layer.conv3.bias)]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _SharedBufferDenseBlock.apply(x, compute_dtype, *params)
    return _dense_forward(x, compute_dtype, params, keep_hidden=False)[0]
