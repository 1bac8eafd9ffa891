"""Point-estimate weights: the deterministic baseline of the Bayesian layers (KL = 0).

    y = x W^T + b  (dense)   or   y = conv(x, W) + b  (valid k x k convolution)
"""
from __future__ import annotations

import torch
from torch import nn

from models.bayes.weights import WeightLayout


class DeterministicLayer(nn.Module):
    stochastic = False

    def __init__(self, in_features: int, out_features: int, kernel_size: int | None = None):
        super().__init__()
        self.layout = WeightLayout(in_features, out_features, kernel_size)
        self.weight = self.layout.init_mean()
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.apply(x, self.weight, self.bias)

    def kl(self) -> torch.Tensor:
        return torch.zeros((), device=self.weight.device, dtype=self.weight.dtype)
