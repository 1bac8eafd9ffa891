"""The one place that knows dense vs. convolutional weights, shared by every Bayesian layer.

A layer maps ``in_features`` to ``out_features``; with ``kernel_size`` None it is dense
(weight (out, in), ``F.linear``), else a valid (unpadded) k x k convolution (weight
(out, in, k, k), ``F.conv2d``).  MNF's multiplicative noise z sits on the weight's
``noise_axis``: the inputs of a dense layer (z in R^in) and the output channels of a
convolution (z in R^out), as in Louizos & Welling 2017 (arXiv:1703.01961 §3.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightLayout:
    def __init__(self, in_features: int, out_features: int, kernel_size: int | None = None):
        if min(in_features, out_features) < 1 or (kernel_size is not None and kernel_size < 1):
            raise ValueError(f"a layer needs positive sizes, got in={in_features}, out={out_features}, "
                             f"kernel={kernel_size}")
        self.in_features, self.out_features, self.kernel_size = in_features, out_features, kernel_size

    @property
    def conv(self) -> bool:
        return self.kernel_size is not None

    @property
    def shape(self) -> tuple[int, ...]:
        k = self.kernel_size
        return (self.out_features, self.in_features) + ((k, k) if self.conv else ())

    @property
    def noise_dim(self) -> int:
        """Dimension of MNF's z: inputs (dense) or output channels (conv)."""
        return self.out_features if self.conv else self.in_features

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, weight, bias) if self.conv else F.linear(x, weight, bias)

    def noise_view(self, z: torch.Tensor) -> torch.Tensor:
        """z of shape (noise_dim,) broadcast against the weight."""
        return z.view(-1, 1, 1, 1) if self.conv else z.view(1, -1)

    def noise_major(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as (noise_dim, rest): rows indexed by z's coordinates."""
        return w.reshape(self.out_features, -1) if self.conv else w.t()

    def init_mean(self, device=None) -> nn.Parameter:
        """He-normal means (fan-in), the biases start at 0."""
        w = torch.empty(self.shape, device=device)
        nn.init.kaiming_normal_(w, nonlinearity="relu")
        return nn.Parameter(w)

    def noisy_mean(self, x: torch.Tensor, z: torch.Tensor, weight_mean: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        """The mean pre-activation of weights z_b * W (+ bias), one z_b per example (z: (B, noise_dim)):
        dense: (x * z_b) W^T; conv: z_b scales the output channels of conv(x, W)."""
        if self.conv:
            return self.apply(x, weight_mean) * z[:, :, None, None] + bias.view(1, -1, 1, 1)
        return F.linear(x * z, weight_mean, bias)
