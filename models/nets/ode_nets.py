"""Time-conditioned networks f(t, z) for continuous normalizing flows (FFJORD, RNODE).

Concat (FFJORD ``ConcatConv2d`` / ``ConcatLinear``): time enters as one extra input
channel (feature) holding t everywhere, placed first:

    y = W [t, x] + b  =  W_x x + b + t (W_t 1)

computed as the right-hand side: the wide layer reads the C channels of x, not C + 1, and the time
channel's part is t times W_t applied to a map of ones (with the same zero padding, so border
positions see fewer taps), a (1, C_out, H, W) map computed at batch 1 per call; the bias joins
that map, which is added to the convolution's output in place (``batch_map.add_batch_map``: the bias
gradient is not summed over the batch a second time, and no second batch-sized tensor is made).  Same parameters and
the same function as the concatenation; an odd C + 1 = 65 is a slow width for the vectorised
convolution kernels (1.3-1.5x the time of 64 on an AVX-512 CPU).

ConcatSquash (FFJORD ``ConcatSquashConv2d`` / ``ConcatSquashLinear``): time gates and
shifts the layer's output channels:

    y = (W x + b) * sigmoid(a t + c) + d t

ODENet (FFJORD ``ODEnet``): time-conditioned layers with hidden widths ``hidden``, a
non-linearity after every layer but the last, and an output of the input's channels.
Conv layers are 3x3 with padding 1 (the stride-1 layers of the official ``--strides 1,1,1,1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.batch_map import add_batch_map, is_nhwc
from models.nets.conv2d import conv2d
from models.nets.softplus import Softplus

LAYER_TYPES = ("concat", "concatsquash")
# softplus: torch's, with a closed-form second derivative (the adjoint differentiates f's vector-Jacobian product)
NONLINEARITIES = {"softplus": Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "relu": nn.ReLU}


def _base_layer(dim_in: int, dim_out: int, conv: bool) -> nn.Module:
    return nn.Conv2d(dim_in, dim_out, kernel_size=3, padding=1) if conv else nn.Linear(dim_in, dim_out)


class ConcatLayer(nn.Module):
    """y = layer([t, x]) = W_x x + b + t (W_t 1): t as the first input channel (feature)."""

    def __init__(self, dim_in: int, dim_out: int, conv: bool):
        super().__init__()
        self.layer = _base_layer(dim_in + 1, dim_out, conv)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)
        weight, bias = self.layer.weight, self.layer.bias
        if isinstance(self.layer, nn.Conv2d):
            ones = torch.ones((1, 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
            time_map = F.conv2d(ones, weight[:, :1], padding=self.layer.padding)  # W_t 1: (1, C_out, H, W)
            shift = t * time_map if bias is None else t * time_map + bias.view(1, -1, 1, 1)  # b + t W_t 1
            weight_x = weight[:, 1:]
            if is_nhwc(x):  # the kernels' layout, made once here rather than in every call that reads it
                weight_x = weight_x.contiguous(memory_format=torch.channels_last)
            y = conv2d(x, weight_x, padding=self.layer.padding[0])  # closed-form 2nd derivatives
            return add_batch_map(y, shift)
        return F.linear(x, weight[:, 1:], bias) + t * weight[:, 0]


class ConcatSquashLayer(nn.Module):
    """y = layer(x) * sigmoid(gate(t)) + shift(t), gate affine and shift linear in t."""

    def __init__(self, dim_in: int, dim_out: int, conv: bool):
        super().__init__()
        self.layer = _base_layer(dim_in, dim_out, conv)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(1, 1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.layer(x) * torch.sigmoid(self.gate(tt)).reshape(shape) + self.shift(tt).reshape(shape)


def time_layer(layer_type: str, dim_in: int, dim_out: int, conv: bool) -> nn.Module:
    if layer_type == "concat":
        return ConcatLayer(dim_in, dim_out, conv)
    if layer_type == "concatsquash":
        return ConcatSquashLayer(dim_in, dim_out, conv)
    raise ValueError(f"unknown layer_type {layer_type!r}; use one of {LAYER_TYPES}")


class ODENet(nn.Module):
    """f(t, z): time-conditioned layers ``channels -> hidden... -> channels``.

    ``zero_last``: the last layer's weights start at zero (RNODE's ``zero_last_weight``),
    so f starts constant in z: the flow starts as a translation with log-det 0.
    """
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, channels: int, hidden: tuple[int, ...] | list[int], conv: bool = True,
                 layer_type: str = "concat", nonlinearity: str = "softplus", zero_last: bool = False):
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; use one of {tuple(NONLINEARITIES)}")
        dims = [channels, *hidden, channels]
        self.layers = nn.ModuleList(time_layer(layer_type, a, b, conv) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = NONLINEARITIES[nonlinearity]()
        if zero_last:
            with torch.no_grad():
                for name, p in self.layers[-1].named_parameters():
                    if name.endswith("weight"):
                        p.zero_()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h
