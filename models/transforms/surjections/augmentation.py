"""Augmentation with learned extra dimensions (VFlow, Chen et al. 2020; SurVAE Flows §3):

    forward:  u ~ q(u | x),  z = [x, u] (u appended as channels),  ldj = -log q(u | x)
    inverse:  x = z[:, :C]   (slicing: the extra channels are dropped)

so E_q[log p(z) + ldj] <= log p(x), and the importance-weighted bound over q tightens it.
The opposite surjection -- slicing in the inference direction, keep x1 and score x2 by a
learned p(x2 | x1) -- is the multi-scale ``Split`` (``split.py``).
"""
from __future__ import annotations

import torch

from models.core.transform import Transform, compute_dtype
from models.transforms.surjections.conditional_noise import ConditionalNoise


class Augmentation(Transform):
    """Appends ``noise.channels`` channels drawn from q(u | x) (the noise sees x as its features)."""

    bijective = False
    stochastic_forward = True
    exact_ldj = False

    def __init__(self, noise: ConditionalNoise):
        super().__init__()
        self.noise = noise

    def forward_aux(self, x, context=None):
        u, log_q, aux = self.noise(x.to(compute_dtype(x)))
        return torch.cat([x, u.to(x.dtype)], dim=1), -log_q, {f"noise.{k}": v for k, v in aux.items()}

    def forward(self, x, context=None):
        z, ldj, _ = self.forward_aux(x, context)
        return z, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        return z[:, : z.shape[1] - self.noise.channels]

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (c + self.noise.channels, h, w)
