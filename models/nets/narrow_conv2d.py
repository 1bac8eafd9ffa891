"""A 'same' stride-1 convolution to a few output channels as one matrix product (CPU inference).

    y[n, :, i, j] = b + sum_{ky, kx} W[:, :, ky, kx] x[n, :, i + ky - p, j + kx - p]     (p = k // 2)

For an NHWC batch the pixels x[n, i, j, :] are the rows of an (N H W) x C_in matrix X without a
copy, so one GEMM gives every tap's contribution to every output channel at every pixel,

    Y = X [W[:, :, 0, 0]^T, ..., W[:, :, k-1, k-1]^T]         (N H W) x (k^2 C_out)
    y[n, i, j] = b + sum_{ky, kx} Y[n, i + ky - p, j + kx - p, (ky, kx)]

and the k^2 shifted sums run over the small Y (rows outside the image are the zero padding).
oneDNN's direct convolution on AVX-512 computes output channels in blocks of 16 lanes, so the last
layer of Residual Flows' g (3x3, 512 -> 3 channels at 32x32) uses 3/16 of its arithmetic: 11.0 ms
against 5.7 ms this way (batch 16, 2 threads); at 16x16 or with 12 outputs the extra passes cost
more than the lanes save, hence the bounds in ``use_narrow_output``.  The same numbers as
F.conv2d up to float summation order.  No autograd: ``models.nets.conv2d.conv2d`` takes this
path only without gradients (sampling's fixed-point iterations), on the CPU.
"""
from __future__ import annotations

import torch

from models.nets.batch_map import is_nhwc

MAX_COLUMNS = 32  # k^2 C_out: two 16-lane blocks; 3x3 to 3 channels is 27
MIN_PIXELS = 16 * 32 * 32  # N H W: below it the k^2 extra passes cost more than oneDNN's idle lanes


def use_narrow_output(x: torch.Tensor, weight: torch.Tensor, padding: int) -> bool:
    """Whether ``narrow_output_conv2d`` is the faster path for this call (see the module docstring)."""
    k = weight.shape[-1]
    return (x.device.type == "cpu" and x.dim() == 4 and is_nhwc(x) and weight.shape[-2] == k and k % 2 == 1
            and padding == k // 2 and k > 1 and weight.shape[0] * k * k <= MAX_COLUMNS
            and x.shape[0] * x.shape[2] * x.shape[3] >= MIN_PIXELS and x.dtype == weight.dtype)


def narrow_output_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=k // 2) for an NHWC x, as one GEMM and k^2 shifted sums;
    the result is NHWC, as oneDNN's."""
    n, c_in, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    p = k // 2
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c_in)  # a view: NHWC memory is this matrix
    columns = k * k * c_out
    # zero columns up to a multiple of 16: the GEMM's edge case costs more than the idle columns
    # (27 columns 7.8 ms, 32 columns 5.2 ms for Residual Flows' layer)
    taps_weight = weight.new_zeros(c_in, -(-columns // 16) * 16)
    taps_weight[:, :columns] = weight.permute(1, 2, 3, 0).reshape(c_in, columns)
    taps = (rows @ taps_weight)[:, :columns].view(n, h, w, k, k, c_out)
    out = taps[:, :, :, p, p].clone()  # the centre tap covers every pixel
    if bias is not None:
        out += bias
    for ky in range(k):
        for kx in range(k):
            dy, dx = ky - p, kx - p
            if dy == 0 and dx == 0:
                continue
            # out[i, j] += taps[i + dy, j + dx, ky, kx] where i + dy, j + dx lie inside the image
            out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
                taps[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx), ky, kx]
    return out.permute(0, 3, 1, 2)
