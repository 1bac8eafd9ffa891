"""Invertible 1x1 convolution (Glow §3.2), plain or LU-decomposed.

    z[:, :, i, j] = W x[:, :, i, j]          log|det| = H * W * log|det W|

Plain: W is a free C x C matrix initialised as a random rotation; log|det W| and
W^-1 are computed in float64 (as the official code does) and cast back.
LU: W = P L (U + diag(sign(s) * exp(log|s|))) with P fixed, L unit lower-triangular
and U strictly upper-triangular, so log|det W| = sum log|s| costs O(C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.transform import Transform, compute_dtype


def _conv1x1_float32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 conv in float32 even under autocast: the flow's stream stays exact-ish."""
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.conv2d(x.to(dtype), weight.to(dtype)[:, :, None, None])


def _random_rotation(c: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    return q.float()


class InvertibleConv1x1(Transform):
    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(num_channels))

    def forward(self, x, context=None):
        z = _conv1x1_float32(x, self.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logdet = torch.linalg.slogdet(self.weight.double())[1].to(compute_dtype(x))
        return z, (logdet * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, z, context=None, *, temperature=1.0):
        return _conv1x1_float32(z, torch.linalg.inv(self.weight.double()))


class InvertibleConv1x1LU(Transform):
    def __init__(self, num_channels: int):
        super().__init__()
        p, l, u = torch.linalg.lu(_random_rotation(num_channels))
        s = torch.diagonal(u)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(l)
        self.upper = nn.Parameter(torch.triu(u, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x, context=None):
        z = _conv1x1_float32(x, self.weight())
        return z, (self.log_s.to(compute_dtype(x)).sum() * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, z, context=None, *, temperature=1.0):
        return _conv1x1_float32(z, torch.linalg.inv(self.weight().double()))
