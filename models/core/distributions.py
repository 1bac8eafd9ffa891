"""Base distributions over the final latent of a flow.

Each one has ``log_prob(z) -> (B,)`` in float32 and ``sample(n, temperature)``.
They are modules so that learned priors (Glow's learned top prior) carry
parameters and move with the model's device.  A ``discrete`` distribution is a pmf over
integer tensors (IDF's prior): its ``log_prob`` is log P(z), exact.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.core.discretized_logistic import DiscretizedLogisticMixture
from models.core.transform import compute_dtype, sum_except_batch

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Sum over non-batch dims of log N(z; mean, exp(log_std)^2), computed in float32."""
    dtype = compute_dtype(z)
    z, mean, log_std = z.to(dtype), mean.to(dtype), log_std.to(dtype)
    return sum_except_batch(-0.5 * LOG_2PI - log_std - 0.5 * ((z - mean) * torch.exp(-log_std)) ** 2)


class Distribution(nn.Module):
    """A distribution over tensors of a fixed shape (C, H, W)."""

    discrete = False

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def _ref(self) -> torch.Tensor:
        """A tensor on the module's device (for sampling)."""
        for t in list(self.parameters()) + list(self.buffers()):
            return t
        return torch.zeros(())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """Map ``z`` to standard noise (for ``Flow.encode``); identity by default."""
        return z

    def unstandardize(self, eps: torch.Tensor) -> torch.Tensor:
        return eps


class StandardNormal(Distribution):
    """N(0, I)."""

    def __init__(self, shape):
        super().__init__(shape)
        self.register_buffer("_device_ref", torch.zeros(()), persistent=False)

    def log_prob(self, z):
        return gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))

    def sample(self, n, temperature=1.0):
        ref = self._device_ref  # follows the model's device and dtype (model.to / model.double())
        return temperature * torch.randn(n, *self.shape, device=ref.device, dtype=ref.dtype)


class Uniform01(Distribution):
    """U(0, 1)^D: log p = 0 inside the unit cube, -inf outside."""

    def __init__(self, shape):
        super().__init__(shape)
        self.register_buffer("_device_ref", torch.zeros(()), persistent=False)

    def log_prob(self, z):
        inside = ((z >= 0) & (z <= 1)).reshape(z.shape[0], -1).all(dim=1)
        return torch.where(inside, 0.0, -math.inf).to(compute_dtype(z))

    def sample(self, n, temperature=1.0):
        return torch.rand(n, *self.shape, device=self._device_ref.device, dtype=self._device_ref.dtype)


class LearnedGaussian(Distribution):
    """Diagonal Gaussian with a learned mean and log-std per element.

    Glow's learned top prior (``--learntop``) is a zero-initialised conv applied to
    a tensor of zeros, i.e. the conv's bias: ``mean, log_std = h`` with ``h`` a
    learned map of shape (2C, H, W).  ``prior_net`` realises exactly that map so
    the parameter count matches the official code.
    """

    def __init__(self, shape, prior_net: nn.Module):
        super().__init__(shape)
        self.prior_net = prior_net
        c, h, w = self.shape
        self.register_buffer("_zeros", torch.zeros(1, 2 * c, h, w), persistent=False)

    def params(self, n: int):
        h = self.prior_net(self._zeros).expand(n, -1, -1, -1)
        mean, log_std = h[:, 0::2], h[:, 1::2]
        return mean, log_std

    def log_prob(self, z):
        mean, log_std = self.params(z.shape[0])
        return gaussian_log_prob(z, mean, log_std)

    def sample(self, n, temperature=1.0):
        mean, log_std = self.params(n)
        return mean + temperature * torch.exp(log_std) * torch.randn_like(mean)

    def standardize(self, z):
        mean, log_std = self.params(z.shape[0])
        return (z - mean) * torch.exp(-log_std)

    def unstandardize(self, eps):
        mean, log_std = self.params(eps.shape[0])
        return mean + torch.exp(log_std) * eps


class DiscretizedLogisticMixturePrior(Distribution):
    """IDF's top prior (Hoogeboom et al. 2019, arXiv:1905.07376 §3.2): a discretized logistic
    mixture with learned parameters per element (official ``Prior``): means, log-scales and
    mixture logits of shape (C, H, W, K), in units of 1 / bin_scale like the rest of the model.
    Initialised as the official code: logits 0, log-scales 0, component j's mean at j - (K - 1) / 2.
    ``log_prob`` is the exact discrete log P(z) of integer z (a pmf, not a density), (B,)."""

    discrete = True

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
