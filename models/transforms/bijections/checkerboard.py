"""Checkerboard split as a reshaping bijection (Flow++; the official ``CheckerboardSplit``).

The official code splits (H, W, C) into two halves a, b of shape (H, W/2, C) by column
parity (a: even columns, b: odd columns) and carries them as a tuple.  Here the tuple is
stacked along channels:

    (C, H, W) -> (2C, H, W/2),   z[:, :C] = x[..., 0::2],   z[:, C:] = x[..., 1::2]

so any channel-wise coupling that conditions on the first C channels is a checkerboard
coupling, and a channel-wise split needs no layer at all (its two halves already are the
first and second half of the channels).  ``CheckerboardMerge`` is ``Inverse(CheckerboardSplit())``
(as the official code).  Permutations: log|det| = 0.
"""
from __future__ import annotations

from models.core.compose import Inverse
from models.core.reshape import checkerboard_merge, checkerboard_split
from models.core.transform import Transform, zeros_ldj


class CheckerboardSplit(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def forward(self, x, context=None):
        if x.shape[-1] % 2:
            raise ValueError(f"checkerboard split needs an even width, got {x.shape[-1]}")
        return checkerboard_split(x), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        return checkerboard_merge(z)

    def inverse_with_ldj(self, z, context=None):
        return checkerboard_merge(z), zeros_ldj(z)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (2 * c, h, w // 2)

    def input_shape(self, out_shape):
        c2, h, w2 = out_shape
        return (c2 // 2, h, 2 * w2)


class CheckerboardMerge(Inverse):
    """The inverse of the split, (2C, H, W/2) -> (C, H, W)."""

    def __init__(self):
        super().__init__(CheckerboardSplit())
