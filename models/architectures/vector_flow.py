"""Classic flows over vectors of shape (D,): one ``Flow`` of ``steps`` layers of one kind on a
N(0, I) base (``models.builders.vector_layers``):

    model.flow: realnvp | nice | maf | iaf | planar | radial | sylvester (+ model.kind)

Maximum likelihood on data (``objective.name: nll``) runs the layers data -> latent,

    log p(x) = log N(T(x); 0, I) + sum_k log|det dT_k/dz_{k-1}|,

and samples through their inverses (planar and Sylvester by bisection, MAF in D passes).
Reverse KL to an energy (``objective.name: reverse_kl``) uses the layers' forwards as the
sampling map from the base instead (``Flow.push_forward``; Rezende & Mohamed 2015,
arXiv:1505.05770).  The data are continuous vectors: no dequantizer (``DEQUANTIZERS = ("none",)``).
"""
from __future__ import annotations

from common.ranges import at_least
from models.builders.vector_layers import FLOWS, SYLVESTER_KINDS, vector_layers
from models.core.distributions import StandardNormal
from models.core.flow import Flow

DEFAULTS = {
    "flow": "realnvp",         # realnvp | nice | maf | iaf | planar | radial | sylvester
    "steps": 8,                # number of layers
    "hidden_channels": 64,     # width of each coupling MLP / MADE
    "hidden_blocks": 2,        # hidden layers of each coupling MLP / MADE
    "kind": "orthogonal",      # sylvester: orthogonal | householder | triangular
    "ortho_vectors": 0,        # sylvester orthogonal: columns M of Q (0: M = D)
}

RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "steps": at_least(1), "hidden_channels": at_least(1), "hidden_blocks": at_least(1), "ortho_vectors": at_least(0),
}

CHOICES = {"flow": FLOWS, "kind": SYLVESTER_KINDS}

DEQUANTIZERS = ("none",)  # continuous vectors: nothing to dequantize


def build(cfg: dict, data_shape: tuple[int, ...], num_bits, dequantizer: dict) -> Flow:
    """``data_shape`` is (D,); ``num_bits`` is unused (continuous data)."""
    if dequantizer.get("kind", "none") != "none":
        raise ValueError(f"vector_flow takes no dequantizer (continuous vectors), "
                         f"got dequantizer.kind {dequantizer['kind']!r}")
    if len(data_shape) != 1:
        raise ValueError(f"vector_flow models vectors of shape (D,), not data of shape {tuple(data_shape)} "
                         f"(use data.name=toy2d or data.name=none)")
    dim = data_shape[0]
    layers = vector_layers(cfg["flow"], dim, cfg["steps"], cfg["hidden_channels"], cfg["hidden_blocks"],
                           cfg["kind"], cfg["ortho_vectors"])
    return Flow(layers, StandardNormal((dim,)), (dim,))
