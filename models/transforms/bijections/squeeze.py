"""Squeeze (RealNVP §3.6): space-to-depth, (C, H, W) -> (4C, H/2, W/2).

Output channel ``4c + 2i + j`` holds input channel ``c`` at offset ``(i, j)`` of each
2x2 block (the official Glow order).  A permutation, so log|det| = 0.
"""
from __future__ import annotations

from models.core.transform import Transform, zeros_ldj


class Squeeze(Transform):
    def forward(self, x, context=None):
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return z, zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        b, c4, h, w = z.shape
        c = c4 // 4
        return z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (4 * c, h // 2, w // 2)
