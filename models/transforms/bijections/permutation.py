"""Fixed channel permutations (Glow's "reverse" and "shuffle" baselines).

    z = x[:, perm]            log|det| = 0
"""
from __future__ import annotations

import torch

from models.core.transform import Transform, zeros_ldj


class ChannelPermutation(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    discrete = True  # a permutation of elements: integers stay integers

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long())
        self.register_buffer("inv_perm", torch.argsort(perm.long()))

    @classmethod
    def reverse(cls, num_channels: int) -> "ChannelPermutation":
        return cls(torch.arange(num_channels - 1, -1, -1))

    @classmethod
    def shuffle(cls, num_channels: int, generator: torch.Generator | None = None) -> "ChannelPermutation":
        return cls(torch.randperm(num_channels, generator=generator))

    def forward(self, x, context=None):
        return x[:, self.perm], zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        return z[:, self.inv_perm]
