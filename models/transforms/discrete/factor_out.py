"""Integer factor-out with a conditional discretized logistic mixture prior (IDF §3.2).

x = [x1, x2] along channels; x1 continues through the flow, x2 leaves it here:

    mu, log s, logits = NN(x1 / bin_scale)            ldj = log P(x2 | x1)   (exact, discrete)

with P the discretized logistic mixture of ``discretized_logistic`` on the integer grid.
The network's outputs are in units of 1 / bin_scale as in the official code:
means = bin_scale * mu, log scales = log s + log(bin_scale).  Per factored-out channel the
network emits 2 numbers (mean, log-scale; one component, the official ``SplitPrior``) or
3K (K means, K log-scales, K mixture logits).  ``split``/``merge`` keep x2 itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.core.transform import sum_except_batch
from models.core.discretized_logistic import DiscretizedLogisticMixture
from models.transforms.surjections.split import FactorOut


def params_per_channel(num_mixtures: int) -> int:
    return 2 if num_mixtures == 1 else 3 * num_mixtures


def mixture_from_net_output(h: torch.Tensor, num_mixtures: int, bin_scale: float) -> DiscretizedLogisticMixture:
    """h: (B, C * params_per_channel, H, W), channel-major -> a mixture over (B, C, H, W)."""
    b, _, height, width = h.shape
    p = params_per_channel(num_mixtures)
    h = h.reshape(b, -1, p, height, width).movedim(2, -1)  # (B, C, H, W, p)
    k = num_mixtures
    means, log_scales = h[..., :k] * bin_scale, h[..., k : 2 * k] + math.log(bin_scale)
    logits = h[..., 2 * k :] if k > 1 else None
    return DiscretizedLogisticMixture(means, log_scales, logits)


class IntegerFactorOut(FactorOut):
    discrete = True

    def __init__(self, prior_net: nn.Module, keep_channels: int, num_mixtures: int = 1, bin_scale: float = 256.0):
        super().__init__(prior_net, keep_channels)
        self.num_mixtures, self.bin_scale = num_mixtures, bin_scale

    def latent_distribution(self, x1: torch.Tensor) -> DiscretizedLogisticMixture:
        """P(x2 | x1), one mixture per element of x2."""
        h = self.prior_net(x1 / self.bin_scale).to(x1.dtype)
        return mixture_from_net_output(h, self.num_mixtures, self.bin_scale)

    def split(self, x, context=None):
        x1, x2 = self.halves(x)
        x1 = x1.contiguous()  # the same layout in both directions of the codec (bit-exact priors)
        return x1, sum_except_batch(self.latent_distribution(x1).log_prob(x2)), x2

    def merge(self, z, latent, context=None):
        return torch.cat([z, latent.to(z.dtype)], dim=1)

    def inverse(self, z, context=None, *, temperature=1.0):
        return self.merge(z, self.latent_distribution(z).sample(temperature), context)
