"""Squeeze (RealNVP §3.6): space-to-depth, (C, H, W) -> (4C, H/2, W/2).

Output channel ``4c + 2i + j`` holds input channel ``c`` at offset ``(i, j)`` of each
2x2 block (the official Glow order).  ``order="tf"``: channel ``(2i + j) C + c``
(TensorFlow's space_to_depth, the order of Flow++'s official code).
A permutation, so log|det| = 0.
"""
from __future__ import annotations

from models.core.transform import Transform, zeros_ldj


class Squeeze(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    discrete = True  # a permutation of elements: integers stay integers

    def __init__(self, order: str = "glow"):
        super().__init__()
        if order not in ("glow", "tf"):
            raise ValueError(f"unknown squeeze order {order!r}; use glow or tf")
        self.order = order

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        if self.order == "tf":
            z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
            return z, zeros_ldj(x)
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return z, zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        b, c4, h, w = z.shape
        c = c4 // 4
        if self.order == "tf":
            return z.reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)
        return z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (4 * c, h // 2, w // 2)
