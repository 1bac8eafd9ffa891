"""One (1, C, H, W) map added to every image of a batch, in the batch's memory layout.

    y_b = x_b + m   for b = 1..B,        dL/dm = sum_b dL/dy_b

Glow's edge-padding term (the is-padding channel's convolution, with the bias) and FFJORD's concat
layers (the time channel's convolution, with the bias) add such a map to a convolution's output.
Written plainly (``x + m``), an NHWC batch pays twice on the CPU: the add of an NCHW map to an NHWC
batch is a strided pass (1.2 ms against 0.1 ms in place, 16 x 512 x 16 x 16), and autograd's
reduction of the NHWC gradient into the NCHW map is a strided sum (5.5 ms against 0.1 ms summed in
memory order).  ``add_batch_map`` adds in place, in the batch's layout, and sums the gradient in
its memory order (``sum_batch``).
"""
from __future__ import annotations

import torch

from models.nets.formula_grad import will_use


def is_nhwc(x: torch.Tensor) -> bool:
    """Channels-last and not also contiguous (a tensor with C == 1 or H == W == 1 is both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def sum_batch(g: torch.Tensor) -> torch.Tensor:
    """sum_b g_b as a (1, C, H, W) map, summed in g's memory order (aten's broadcast reduction of an
    NHWC gradient into an NCHW map is a strided sum, 10-50x slower)."""
    if is_nhwc(g):
        return g.permute(0, 2, 3, 1).sum(0, keepdim=True).permute(0, 3, 1, 2)
    return g.sum(0, keepdim=True)


class _AddMap(torch.autograd.Function):
    """y + m in place on y (no second batch-sized tensor); dL/dm = sum_b dL/dy_b (``sum_batch``)."""

    @staticmethod
    def forward(ctx, y, m):
        ctx.mark_dirty(y)
        return y.add_(m)

    @staticmethod
    def backward(ctx, grad):
        if not will_use(ctx)[1]:  # (a vector-Jacobian product for y's input alone: no map gradient)
            return grad, None
        return grad, sum_batch(grad)


def add_batch_map(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """y + m for a batch y (B, C, H, W) that nothing else reads (a layer's fresh output: it is
    overwritten) and a map m (1, C, H, W); m is laid out as y first."""
    if is_nhwc(y):
        m = m.contiguous(memory_format=torch.channels_last)
    return _AddMap.apply(y, m)
