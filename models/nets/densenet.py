"""The DenseNet conditioner of Integer Discrete Flows (Hoogeboom et al. 2019, official ``models/networks.py``).

    DenseLayer:  h = [x, ReLU(conv3x3(ReLU(conv1x1(x))))]           (n -> n + growth channels)
    DenseBlock:  ``depth`` dense layers whose growths sum to ``hidden_channels``
                 (growth_d = remaining // (depth - d), so the channels grow evenly)
    DenseNet:    DenseBlock(c_in -> c_in + hidden) -> zero-initialised conv3x3 -> c_out

``DenseNet.forward`` computes the block in one shared buffer (``models.nets.dense_block``):
the same map, about half the saved activations, no concatenation copies.

The last convolution starts at zero, so a new coupling is the identity and a new split
prior outputs zeros.  IDF's CIFAR-10 networks: depth 12, hidden (total growth) 512.
"""
from __future__ import annotations

import torch
from torch import nn

from models.nets.dense_block import shared_buffer_dense_block


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(),
            nn.Conv2d(in_channels, growth, 3, padding=1), nn.ReLU(),
        )

    @property
    def conv1(self) -> nn.Conv2d:
        return self.net[0]

    @property
    def conv3(self) -> nn.Conv2d:
        return self.net[2]

    def forward(self, x):
        return torch.cat([x, self.net(x)], dim=1)


def dense_growths(total: int, depth: int) -> list[int]:
    """Per-layer growths that sum to ``total``: each takes remaining // layers left."""
    growths = []
    for d in range(depth):
        growths.append(total // (depth - d))
        total -= growths[-1]
    return growths


class DenseNet(nn.Module):
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512, depth: int = 12):
        super().__init__()
        layers, channels = [], in_channels
        for growth in dense_growths(hidden_channels, depth):
            layers.append(DenseLayer(channels, growth))
            channels += growth
        self.block = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        # the same map as self.block(x), layer by layer, in one buffer (models.nets.dense_block)
        return self.out(shared_buffer_dense_block(x, self.block))
