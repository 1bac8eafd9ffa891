"""ActNorm (Kingma & Dhariwal 2018, arXiv:1807.03039, Glow §3.1) as a bijection.

    y = (x + b) * exp(s)            per channel
    log|det| = H * W * sum_c s_c

Data-dependent init on the first batch it sees (``models.nets.actnorm.ActNorm2d``, the
same affine map as a network layer, holds the parameters and the init): b = -mean,
s = log(1 / (std + eps)), so the output has zero mean and unit variance per channel.

``spatial_shape=(H, W)`` gives one (b, s) per element instead of per channel (Flow++'s
``Norm``): statistics over the batch only, log|det| = sum_{c,h,w} s_chw.
"""
from __future__ import annotations

import torch

from models.core.transform import Transform, compute_dtype
from models.nets.actnorm import ActNorm2d


class ActNorm(ActNorm2d, Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    needs_data_init = True

    def forward(self, x, context=None):
        z = self.normalize(x)
        per_position = 1 if self.per_element else x.shape[2] * x.shape[3]
        ldj = (self._log_scale().to(compute_dtype(x)).sum() * per_position).expand(x.shape[0])
        return z, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        return z * torch.exp(-self._log_scale()).to(z.dtype) - self.bias.to(z.dtype)
