"""Inverse autoregressive flow layer (Kingma et al. 2016), the mirror image of MAF.

The MADE reads the latent side.  Sampling direction (``inverse``, z -> x), ONE pass:

    (mu, alpha) = MADE(z),   x = z * exp(alpha(z)) + mu(z)

Density direction (``forward``, x -> z) must recover z_<d before z_d: D sequential passes,

    z_d = (x_d - mu_d(z_<d)) exp(-alpha_d(z_<d)),   log|det dz/dx| = -sum_d alpha_d(z)

So IAF samples fast and scores new data slowly; MAF the other way round
(``benchmarks/maf_iaf.py`` times both).  In a VAE posterior the sampling direction is
the one needed, with log|det dx/dz| = sum alpha from the same pass.
"""
from __future__ import annotations

from models.core.transform import Transform
from models.nets.made import MADE
from models.transforms.vector.autoregressive import denormalize_one_pass, normalize_sequential


class IAF(Transform):
    def __init__(self, made: MADE):
        super().__init__()
        if made.params != 2:
            raise ValueError("IAF needs a MADE with params=2 (shift, log-scale)")
        self.made = made

    def forward(self, x, context=None):
        return normalize_sequential(self.made, x, context)

    def inverse(self, z, context=None, *, temperature=1.0):
        return denormalize_one_pass(self.made, z, context)[0]

    def inverse_with_ldj(self, z, context=None):
        """(x, log|det dx/dz|) in one pass (the generic fallback would run the D-pass forward)."""
        return denormalize_one_pass(self.made, z, context)

    def sample_with_logdet(self, z, context=None):
        """x = inverse(z) and log|det dx/dz| = sum alpha(z), from one pass."""
        return self.inverse_with_ldj(z, context)
