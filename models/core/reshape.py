"""Pure reshapes shared by layers and networks.

Checkerboard split (Flow++, arXiv:1902.00275; RealNVP's checkerboard masking): the columns
of even and odd parity stacked along channels,

    (B, C, H, W) -> (B, 2C, H, W/2),   z[:, :C] = x[..., 0::2],   z[:, C:] = x[..., 1::2]

and its inverse ``checkerboard_merge``.
"""
from __future__ import annotations

import torch


def checkerboard_split(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h, w // 2, 2).permute(0, 4, 1, 2, 3).reshape(b, 2 * c, h, w // 2)


def checkerboard_merge(z: torch.Tensor) -> torch.Tensor:
    b, c2, h, w2 = z.shape
    return z.reshape(b, 2, c2 // 2, h, w2).permute(0, 2, 3, 4, 1).reshape(b, c2 // 2, h, 2 * w2)
