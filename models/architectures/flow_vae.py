"""The flow-VAE (Rezende & Mohamed 2015, arXiv:1505.05770 §4.2, §6.2) as a family: MLP encoder
and decoder of width ``hidden_channels``, a ``latent_dim``-d latent with N(0, I) prior, a
Bernoulli likelihood, and a posterior N(mu(x), sigma(x)^2) followed by K = ``steps`` layers of
``flow`` (planar | radial | iaf | sylvester; ``models.vae.flow_vae``):

    -ELBO(x) = E_q[ log q_K(z_K | x) - log p(z_K) - log p(x | z_K) ],
    log q_K(z_K | x) = log q_0(z_0 | x) - sum_k log|det df_k/dz_{k-1}|

trained with ``objective.name: elbo`` on binary images (``data.n_bits=1``: pixel >= 128,
flattened by the model).  It is not a flow over x, so it takes no dequantizer
(``DEQUANTIZERS = ("none",)``); the trainer's hooks come from ``models.core.hooks``.
"""
from __future__ import annotations

import math

from common.ranges import at_least
from models.builders.vector_layers import SYLVESTER_KINDS
from models.vae.flow_vae import FLOWS, FlowVAE

DEFAULTS = {
    "flow": "planar",          # posterior flow: planar | radial | iaf | sylvester
    "steps": 0,                # K posterior flow layers (0: the diagonal Gaussian)
    "latent_dim": 40,          # dimension of z
    "hidden_channels": 300,    # width of the encoder / decoder MLPs (and of the iaf MADEs, the amortisers' context)
    "kind": "orthogonal",      # sylvester: orthogonal | householder | triangular
    "ortho_vectors": 8,        # sylvester orthogonal: columns M of Q (at most latent_dim)
}

RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "steps": at_least(0), "latent_dim": at_least(1), "hidden_channels": at_least(1), "ortho_vectors": at_least(1),
}

CHOICES = {"flow": FLOWS, "kind": SYLVESTER_KINDS}

DEQUANTIZERS = ("none",)  # binary data under a Bernoulli likelihood: nothing to dequantize


def build(cfg: dict, data_shape: tuple[int, ...], num_bits, dequantizer: dict) -> FlowVAE:
    """A FlowVAE for binary images of ``data_shape`` (``num_bits`` must be 1)."""
    if dequantizer.get("kind", "none") != "none":
        raise ValueError(f"flow_vae takes no dequantizer, got dequantizer.kind {dequantizer['kind']!r}")
    if num_bits != 1:
        raise ValueError(f"flow_vae has a Bernoulli likelihood and needs binary images (data.n_bits=1), "
                         f"got {num_bits}-bit data")
    for key in ("latent_dim", "hidden_channels"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["steps"] < 0:
        raise ValueError(f"steps must be >= 0, got {cfg['steps']}")
    return FlowVAE(math.prod(data_shape), cfg["latent_dim"], cfg["hidden_channels"], cfg["flow"], cfg["steps"],
                   data_shape=data_shape, kind=cfg["kind"], ortho_vectors=cfg["ortho_vectors"])
