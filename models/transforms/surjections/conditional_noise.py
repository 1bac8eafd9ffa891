"""Learned conditional noise u ~ q(u | x), the variational part of a surjection
(SurVAE Flows, Nielsen et al. 2020, §3; Flow++ §3.2 for dequantization):

    eps ~ N(0, I),   u = g(eps; c),   c = context_net(features of x)
    log q(u | x) = log N(eps; 0, I) - sum_k log|det d g_k / d (its input)|

``g`` is a list of transforms that take the context (e.g. Flow++'s checkerboard
logistic-mixture couplings, or :class:`ConditionalAffine`).  Variational dequantization,
the argmax surjections and augmentation all draw their noise this way.
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.compose import Compose
from models.core.distributions import gaussian_log_prob
from models.core.transform import Transform, compute_dtype, sum_except_batch


def push_noise(flow: Compose, eps: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(u, log q(u), auxiliary losses of g) for u = g(eps; context) with eps ~ N(0, I),
    by the change of variables."""
    u, ldj, aux = flow.forward_aux(eps, context)
    return u, gaussian_log_prob(eps, torch.zeros_like(eps), torch.zeros_like(eps)) - ldj, aux


class ConditionalNoise(nn.Module):
    """q(u | x) with ``channels`` noise channels at the spatial size of the features."""

    def __init__(self, flow: list[Transform], context_net: nn.Module, channels: int):
        super().__init__()
        self.flow = Compose(flow)
        self.context_net = context_net
        self.channels = channels

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(u, log q(u | x), auxiliary losses) given continuous ``features`` of x, shape (B, C_f, H, W)."""
        b, _, h, w = features.shape
        eps = torch.randn(b, self.channels, h, w, device=features.device, dtype=features.dtype)
        return push_noise(self.flow, eps, self.context_net(features))


class ConditionalAffine(Transform):
    """Element-wise affine map conditioned on a context (a conditional Gaussian when applied to N(0, I)):

        (m, s) = net(c),   u = eps * exp(s) + m,   log|det| = sum s
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def _params(self, context, dtype):
        h = self.net(context).to(dtype)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x, context=None):
        shift, log_scale = self._params(context, compute_dtype(x))
        return x * torch.exp(log_scale) + shift, sum_except_batch(log_scale.expand_as(x))

    def inverse(self, z, context=None, *, temperature=1.0):
        shift, log_scale = self._params(context, compute_dtype(z))
        return (z - shift) * torch.exp(-log_scale)
