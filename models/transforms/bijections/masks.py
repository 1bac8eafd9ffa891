"""Binary masks for masked coupling layers (RealNVP §3.4; NICE §5).

checkerboard(C, H, W, parity): 1 where (i + j + parity) is even, every channel alike.
channel(C, H, W, parity):      1 on the first half of the channels (parity 0) or the second.
alternating(D, parity):        1 on even (parity 0) or odd coordinates of a vector.
half(D, parity):               1 on the first half (parity 0) or the second half of a vector.

A coupling with mask ``m`` leaves ``m * x`` unchanged and transforms ``(1 - m) * x``
conditioned on it; alternating the parity between layers updates every coordinate.
"""
from __future__ import annotations

import torch


def checkerboard(channels: int, height: int, width: int, parity: int = 0) -> torch.Tensor:
    i = torch.arange(height)[:, None]
    j = torch.arange(width)[None, :]
    m = ((i + j + parity) % 2 == 0).float()
    return m.expand(channels, height, width).clone()


def channel(channels: int, height: int, width: int, parity: int = 0) -> torch.Tensor:
    m = torch.zeros(channels, height, width)
    half = channels // 2
    if parity % 2 == 0:
        m[:half] = 1.0
    else:
        m[half:] = 1.0
    return m


def alternating(dim: int, parity: int = 0) -> torch.Tensor:
    return ((torch.arange(dim) + parity) % 2 == 0).float()


def half(dim: int, parity: int = 0) -> torch.Tensor:
    m = torch.zeros(dim)
    if parity % 2 == 0:
        m[: dim // 2] = 1.0
    else:
        m[dim // 2:] = 1.0
    return m
