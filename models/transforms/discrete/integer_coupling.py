"""Integer additive coupling (IDF §3.1, Eq. 6):

    z1 = x1,    z2 = x2 + round(t(x1)),        inverse  x2 = z2 - round(t(z1)),    ldj = 0

``x = [x1, x2]`` along channels; ``x2`` is the last quarter (``split="quarter"``, IDF's
``split_quarter``) or half of the channels.  The network sees ``x1 / bin_scale`` (the
official code works on x / 2^bits) and its output is a translation in units of
1 / bin_scale, so ``round(bin_scale * net(x1 / bin_scale))`` is the integer translation.
The rounding is hard in both directions and straight-through for gradients, so forward
and inverse are exact integer maps whatever the float error inside the network.
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, zeros_ldj
from models.transforms.discrete.rounding import round_straight_through

SPLITS = {"quarter": 4, "half": 2}


def translated_channels(channels: int, split: str) -> int:
    """Channels of x2 (the translated part) for a ``quarter`` or ``half`` split."""
    return channels // SPLITS[split]


class IntegerAdditiveCoupling(Transform):
    discrete = True

    def __init__(self, net: nn.Module, conditioning_channels: int, bin_scale: float = 256.0):
        super().__init__()
        self.net, self.split_at, self.bin_scale = net, conditioning_channels, bin_scale

    def translation(self, x1: torch.Tensor) -> torch.Tensor:
        """round(bin_scale * net(x1 / bin_scale)): an integer-valued tensor."""
        return round_straight_through(self.bin_scale * self.net(x1 / self.bin_scale).to(x1.dtype))

    def forward(self, x, context=None):
        x1, x2 = x[:, : self.split_at], x[:, self.split_at :]
        return torch.cat([x1, x2 + self.translation(x1)], dim=1), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        z1, z2 = z[:, : self.split_at], z[:, self.split_at :]
        return torch.cat([z1, z2 - self.translation(z1)], dim=1)
