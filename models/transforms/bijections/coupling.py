"""Channel-wise coupling layers (Dinh et al. 2015/2017; Glow §3.3).

The input splits along channels into x = [x_a, x_b]; a network sees x_a only:

    h = NN(x_a);  shift = h[:, 0::2],  raw = h[:, 1::2]
    affine   (Glow):  z_b = (x_b + shift) * sigmoid(raw + 2),  log|det| = sum log sigmoid(raw + 2)
    additive (NICE):  z_b = x_b + shift (the network outputs shift only), log|det| = 0
    z = [x_a, z_b]

Under autocast the network may run in bf16; the coupling arithmetic and its
log-determinant are done in float32 (the stream's dtype is kept).

The network's last layer is zero-initialised, so every coupling starts close to the
identity (affine: scale sigmoid(2) ~ 0.88).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.transform import Transform, compute_dtype, sum_except_batch, zeros_ldj


class AffineCoupling(Transform):
    """Glow's affine coupling. ``net`` maps C_a channels to 2 * C_b channels."""
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations

    def __init__(self, net: nn.Module, split_channels: int):
        super().__init__()
        self.net, self.split_channels = net, split_channels

    def _shift_logscale(self, x_a):
        h = self.net(x_a).to(compute_dtype(x_a))  # the network may run in bf16; the coupling not
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, F.logsigmoid(raw + 2.0)

    def forward(self, x, context=None):
        x_a, x_b = x[:, : self.split_channels], x[:, self.split_channels :]
        shift, log_scale = self._shift_logscale(x_a)
        z_b = (x_b.to(shift.dtype) + shift) * torch.exp(log_scale)
        return torch.cat([x_a, z_b], dim=1), sum_except_batch(log_scale)

    def inverse(self, z, context=None, *, temperature=1.0):
        z_a, z_b = z[:, : self.split_channels], z[:, self.split_channels :]
        shift, log_scale = self._shift_logscale(z_a)
        x_b = z_b.to(shift.dtype) * torch.exp(-log_scale) - shift
        return torch.cat([z_a, x_b], dim=1)


class AdditiveCoupling(Transform):
    """NICE/Glow additive coupling. ``net`` maps C_a channels to C_b channels."""
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations

    def __init__(self, net: nn.Module, split_channels: int):
        super().__init__()
        self.net, self.split_channels = net, split_channels

    def forward(self, x, context=None):
        x_a, x_b = x[:, : self.split_channels], x[:, self.split_channels :]
        return torch.cat([x_a, x_b + self.net(x_a).to(x_b.dtype)], dim=1), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        z_a, z_b = z[:, : self.split_channels], z[:, self.split_channels :]
        return torch.cat([z_a, z_b - self.net(z_a).to(z_b.dtype)], dim=1)
