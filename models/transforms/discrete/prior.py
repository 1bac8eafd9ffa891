"""IDF's top prior: a discretized logistic mixture with learned parameters per element
(official ``Prior``): means, log-scales and mixture logits of shape (C, H, W, K),
in units of 1 / bin_scale like the rest of the model.  Initialised as the official
code: logits 0, log-scales 0, component j's mean at j - (K - 1) / 2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.core.distributions import Distribution
from models.core.transform import sum_except_batch
from models.transforms.discrete.discretized_logistic import DiscretizedLogisticMixture


class DiscretizedLogisticMixturePrior(Distribution):
    def __init__(self, shape, num_mixtures: int = 5, bin_scale: float = 256.0):
        super().__init__(shape)
        k = num_mixtures
        self.bin_scale = bin_scale
        self.means = nn.Parameter((torch.arange(k) - (k - 1) / 2).expand(*self.shape, k).clone().to(torch.get_default_dtype()))
        self.log_scales = nn.Parameter(torch.zeros(*self.shape, k))
        self.logits = nn.Parameter(torch.zeros(*self.shape, k)) if k > 1 else None

    def distribution(self, n: int) -> DiscretizedLogisticMixture:
        """The prior of a batch of n latents (same parameters for each)."""
        def batch(p):
            return None if p is None else p.unsqueeze(0).expand(n, *p.shape)
        return DiscretizedLogisticMixture(batch(self.means) * self.bin_scale,
                                          batch(self.log_scales) + math.log(self.bin_scale), batch(self.logits))

    def log_prob(self, z):
        return sum_except_batch(self.distribution(z.shape[0]).log_prob(z))

    def sample(self, n, temperature=1.0):
        return self.distribution(n).sample(temperature)
