"""Conditioner networks of RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, §4.1).

ResNetConditioner: conv3x3 -> num_blocks x residual block -> BN -> ReLU -> conv3x3 (zero-init),
    residual block:  x + conv3x3(ReLU(BN(conv3x3(ReLU(BN(x))))))
    with optional weight normalisation on every conv (the paper uses batch norm and weight norm).
    Maps (B, C_in, H, W) to (B, C_out, H, W); the zero-initialised last conv makes each
    coupling start as the identity.
MLPConditioner: Linear -> ReLU -> ... -> Linear (zero-init), for vector couplings.
ZeroPrior: outputs zeros, so that the multi-scale ``Split`` factors out to a fixed
    N(0, I) as RealNVP does (mean 0, log-std 0) instead of Glow's learned prior.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int, weight_norm: bool) -> nn.Module:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    return nn.utils.parametrizations.weight_norm(conv) if weight_norm else conv


class ResidualBlock(nn.Module):
    def __init__(self, features: int, weight_norm: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(features), nn.ReLU(), _conv(features, features, 3, weight_norm),
            nn.BatchNorm2d(features), nn.ReLU(), _conv(features, features, 3, weight_norm),
        )

    def forward(self, x):
        return x + self.body(x)


class ResNetConditioner(nn.Module):
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, in_channels: int, out_channels: int, features: int = 64, num_blocks: int = 8,
                 weight_norm: bool = False):
        super().__init__()
        self.inp = _conv(in_channels, features, 3, weight_norm)
        self.blocks = nn.Sequential(*[ResidualBlock(features, weight_norm) for _ in range(num_blocks)])
        self.out_norm = nn.BatchNorm2d(features)
        self.out = nn.Conv2d(features, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        h = self.blocks(self.inp(x))
        return self.out(torch.relu(self.out_norm(h)))


class MLPConditioner(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden: int = 64, layers: int = 2,
                 zero_init: bool = True):
        super().__init__()
        mods, d = [], in_features
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        last = nn.Linear(d, out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*mods, last)

    def forward(self, x):
        return self.net(x)


class ZeroPrior(nn.Module):
    """prior_net for :class:`Split` giving mean 0 and log-std 0: a N(0, I) factor-out."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x):
        b, _, h, w = x.shape
        return torch.zeros(b, self.out_channels, h, w, device=x.device, dtype=x.dtype)
