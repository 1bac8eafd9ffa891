"""Multi-scale factor-out with a learned conditional prior (RealNVP §3.6; Glow).

x = [x1, x2] along channels.  x1 continues through the flow; x2 leaves it here and
is scored by a prior conditioned on x1 (Glow's ``split2d_prior``):

    mean, log_std = NN(x1)        ldj = log N(x2; mean, exp(log_std)^2)

In the inverse direction x2 is sampled: x2 = mean + temperature * exp(log_std) * eps.
``split``/``merge`` keep eps = (x2 - mean) / exp(log_std), so ``Flow.encode`` /
``Flow.decode`` reconstruct x exactly (to float precision).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.distributions import gaussian_log_prob
from models.core.transform import Transform, compute_dtype


class FactorOut(Transform):
    """Base of the factor-out layers: x = [x1, x2] along channels, x1 (the first
    ``keep_channels``) goes on, x2 leaves scored by ``prior_net(x1)``.  Subclasses define
    ``split`` (-> x1, log p(x2 | x1), latent) and ``merge``; ``forward`` is ``split``
    without the latent."""

    bijective = False
    stochastic_inverse = True
    factors_out = True

    def __init__(self, prior_net: nn.Module, keep_channels: int):
        super().__init__()
        self.prior_net, self.keep_channels = prior_net, keep_channels

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.keep_channels], x[:, self.keep_channels :]

    def forward(self, x, context=None):
        z, ldj, _ = self.split(x, context)
        return z, ldj

    def latent_distribution(self, kept: torch.Tensor):
        """The distribution of the latent ``split`` keeps, given the part that went on
        (discrete factor-outs: what an entropy coder codes the latent with)."""
        raise NotImplementedError(f"{type(self).__name__} has no coding distribution for its latent")

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (self.keep_channels, h, w)


class Split(FactorOut):
    """Gaussian conditional prior; the latent kept by ``split`` is the standardised eps."""

    def _prior(self, x1):
        h = self.prior_net(x1)
        h = h.to(compute_dtype(x1))
        return h[:, 0::2], h[:, 1::2]

    def split(self, x, context=None):
        x1, x2 = self.halves(x)
        mean, log_std = self._prior(x1)
        eps = (x2.to(mean.dtype) - mean) * torch.exp(-log_std)
        return x1, gaussian_log_prob(x2, mean, log_std), eps

    def merge(self, z, latent, context=None):
        mean, log_std = self._prior(z)
        x2 = mean + torch.exp(log_std) * latent.to(mean.dtype)
        return torch.cat([z, x2.to(z.dtype)], dim=1)

    def inverse(self, z, context=None, *, temperature=1.0):
        mean, log_std = self._prior(z)
        eps = temperature * torch.randn(mean.shape, device=z.device)
        return self.merge(z, eps, context)
