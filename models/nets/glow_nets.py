"""Conditioner networks of Glow (official ``tfops.py``).

EdgePaddedConv2d: a "same" convolution whose input carries one extra channel that
    is 1 on the zero padding and 0 inside (``add_edge_padding``), so the network can
    tell image borders from dark pixels.
ZeroConv2d: the last layer of every Glow network, zero-initialised and scaled by a
    learned per-channel factor: out = (W * x + b) * exp(3 * logs).
GlowCouplingNet: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> ZeroConv2d 3x3.

A per-channel scale and shift after a convolution is folded into the convolution itself:
    (W * x + b) * s = (W s) * x + b s        (s, b per output channel)
so ConvActNorm and ZeroConv2d run one convolution with a rescaled C_out x C_in x k x k weight
and a bias, instead of a convolution followed by an elementwise pass over the wide activation
(and that pass's two products in the backward).  Parameters and state_dict are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.actnorm import ActNorm2d
from models.nets.batch_map import add_batch_map


class EdgePaddedConv2d(nn.Conv2d):
    """kxk convolution with zero padding plus an is-padding input channel (odd k)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, edge_padding: bool = True):
        self.edge_padding = edge_padding and kernel_size > 1
        extra = 1 if self.edge_padding else 0
        super().__init__(in_channels + extra, out_channels, kernel_size, padding=0 if self.edge_padding else kernel_size // 2, bias=bias)

    def forward(self, x):
        return self.conv(x, self.weight, self.bias)

    def conv(self, x, weight, bias):
        """This layer's convolution with the given weight (C_out, C_in [+1], k, k) and bias."""
        if not self.edge_padding:
            return F.conv2d(x, weight, bias, padding=self.padding)
        # conv([pad(x), m]) = conv(x, W_x, padding=p) + conv(m, W_m): the mask term is one
        # (1, 1, H+2p, W+2p) map per call, so the wide activation is never padded or copied
        p = self.kernel_size[0] // 2
        h, w = x.shape[2:]
        out = F.conv2d(x, weight[:, :-1], None, padding=p)
        pad_mask = F.pad(torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype), (p, p, p, p), value=1.0)
        return add_batch_map(out, F.conv2d(pad_mask, weight[:, -1:], bias))  # in out's layout, both ways


def _scaled(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None = None):
    """(W s, (b [+ shift]) s) for a per-output-channel scale s (and a shift added before it)."""
    scale = scale.reshape(-1)
    b = None if bias is None else bias
    if shift is not None:
        b = shift.reshape(-1) if b is None else b + shift.reshape(-1)
    return weight * scale[:, None, None, None], None if b is None else b * scale


class ZeroConv2d(EdgePaddedConv2d):
    """Zero-initialised conv with a learned output scale exp(logscale_factor * logs)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, edge_padding: bool = True, logscale_factor: float = 3.0):
        super().__init__(in_channels, out_channels, kernel_size, bias=True, edge_padding=edge_padding)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x):  # (W * x + b) * exp(3 logs), folded into the convolution
        weight, bias = _scaled(self.weight, self.bias, torch.exp(self.logs * self.logscale_factor))
        return self.conv(x, weight.to(x.dtype), bias.to(x.dtype))


class ConvActNorm(nn.Module):
    """Bias-free conv followed by ActNorm (Glow's ``conv2d`` with ``do_actnorm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, edge_padding: bool = True):
        super().__init__()
        self.conv = EdgePaddedConv2d(in_channels, out_channels, kernel_size, bias=False, edge_padding=edge_padding)
        self.norm = ActNorm2d(out_channels)

    def forward(self, x):  # ActNorm((W * x)) = (W * x + b) * s, folded into the convolution
        norm = self.norm
        if not norm.is_initialized():
            return norm.normalize(self.conv(x))  # the first batch initialises b, s from W * x
        weight, bias = _scaled(self.conv.weight, None, torch.exp(norm._log_scale()), shift=norm.bias)
        return self.conv.conv(x, weight.to(x.dtype), bias.to(x.dtype))


class GlowCouplingNet(nn.Sequential):
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512, edge_padding: bool = True):
        super().__init__(
            ConvActNorm(in_channels, hidden_channels, 3, edge_padding),
            nn.ReLU(),
            ConvActNorm(hidden_channels, hidden_channels, 1, edge_padding),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels, 3, edge_padding),
        )
