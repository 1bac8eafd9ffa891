"""Masked autoregressive flow layer (Papamakarios, Pavlakou & Murray 2017).

Density direction (``forward``, data x -> latent z), ONE pass of the MADE on x:

    (mu, alpha) = MADE(x),   z_d = (x_d - mu_d(x_<d)) exp(-alpha_d(x_<d))
    log|det dz/dx| = -sum_d alpha_d

Sampling direction (``inverse``): x_d = z_d exp(alpha_d) + mu_d needs x_<d first, so
D sequential MADE passes.  The mirror image is :class:`models.transforms.vector.iaf.IAF`.
``context`` (B, C) conditions the MADE (its ``context_features``).
"""
from __future__ import annotations

from models.core.transform import Transform
from models.nets.made import MADE
from models.transforms.vector.autoregressive import denormalize_sequential, normalize_one_pass


class MAF(Transform):
    def __init__(self, made: MADE):
        super().__init__()
        if made.params != 2:
            raise ValueError("MAF needs a MADE with params=2 (shift, log-scale)")
        self.made = made

    def forward(self, x, context=None):
        return normalize_one_pass(self.made, x, context)

    def inverse(self, z, context=None, *, temperature=1.0):
        return denormalize_sequential(self.made, z, context)[0]
