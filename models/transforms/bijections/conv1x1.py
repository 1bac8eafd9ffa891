"""Invertible 1x1 convolution (Glow §3.2), plain or LU-decomposed.

    z[:, :, i, j] = W x[:, :, i, j]          log|det| = H * W * log|det W|

The same layers act on vectors (B, D) as a learned invertible linear map z = W x with
log|det| = log|det W| (H * W = 1): the "learned permutation" of vector flows.

Plain: W is a free C x C matrix initialised as a random rotation; log|det W| and
W^-1 are computed in float64 (as the official code does) and cast back.
``init="noisy_identity"`` starts from I + 0.001 N(0, 1) (Flow++'s ``Pointwise``).
LU: W = P L (U + diag(sign(s) * exp(log|s|))) with P fixed, L unit lower-triangular
and U strictly upper-triangular, so log|det W| = sum log|s| costs O(C).

W^-1 comes from ``torch.linalg.inv_ex``, which leaves its error flag on the device: on a GPU
sampling never waits for the host per layer (``inv`` synchronises to check it).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, compute_dtype


def _conv1x1_float32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 conv in float32 even under autocast: the flow's stream stays exact-ish."""
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.dim() == 2:  # vectors (B, D): z = W x
            return x.to(dtype) @ weight.to(dtype).T
        # a 1x1 conv is W applied to (B, C, H*W): as a matmul it is 1.5-4x faster than
        # F.conv2d on CPU at Glow's channel counts (benchmarks/profile_step.py), same numbers
        b, c, h, w = x.shape
        return (weight.to(dtype) @ x.to(dtype).reshape(b, c, h * w)).view(b, c, h, w)


def _positions(x: torch.Tensor) -> int:
    """Number of positions the matrix is applied at: H * W for images, 1 for vectors."""
    return x[0, 0].numel()


def _inverse(weight: torch.Tensor) -> torch.Tensor:
    """W^-1 without a host synchronisation (W is invertible by construction of the layer)."""
    return torch.linalg.inv_ex(weight)[0]


def _random_rotation(c: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    # row-major, as every other parameter (LAPACK returns column-major), and as the optimizer's moments
    # read back from a checkpoint are: torch's fused Adam pairs a parameter with its moments by memory
    # position (a column-major weight resumed with fused=True got wrong updates)
    return q.float().contiguous()


class InvertibleConv1x1(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, num_channels: int, init: str = "rotation"):
        super().__init__()
        if init == "rotation":
            weight = _random_rotation(num_channels)
        elif init == "noisy_identity":
            weight = torch.eye(num_channels) + 1e-3 * torch.randn(num_channels, num_channels)
        else:
            raise ValueError(f"unknown init {init!r}; use rotation or noisy_identity")
        self.weight = nn.Parameter(weight)

    def forward(self, x, context=None):
        z = _conv1x1_float32(x, self.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logdet = torch.linalg.slogdet(self.weight.double())[1].to(compute_dtype(x))
        return z, (logdet * _positions(x)).expand(x.shape[0])

    def inverse(self, z, context=None, *, temperature=1.0):
        return _conv1x1_float32(z, _inverse(self.weight.double()))


class InvertibleConv1x1LU(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
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
        return z, (self.log_s.to(compute_dtype(x)).sum() * _positions(x)).expand(x.shape[0])

    def inverse(self, z, context=None, *, temperature=1.0):
        return _conv1x1_float32(z, _inverse(self.weight().double()))
