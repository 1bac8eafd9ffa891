"""The one builder of flow layers over vectors (B, D), shared by the ``vector_flow`` family,
the flow-VAE's posterior flows and ``benchmarks/maf_iaf.py``.

``vector_layers(flow, dim, steps, ...)`` returns ``steps`` layers of one kind (knobs named as in
the README's config glossary: ``steps`` layers, ``hidden_channels`` / ``hidden_blocks`` width and
depth of each MLP or MADE):

    realnvp    affine couplings z_b = x_b * exp(s(x_a)) + t(x_a) on alternating masks
               (Dinh et al. 2017, arXiv:1605.08803), MLP conditioners
    nice       additive couplings z_b = x_b + t(x_a) on alternating masks, then one diagonal
               scaling (Dinh et al. 2015, arXiv:1410.8516 §5)
    maf        MADE autoregressive layers, one-pass density direction
               z = (x - mu(x)) exp(-alpha(x)) (Papamakarios et al. 2017, arXiv:1705.07057)
    iaf        the mirror image: one-pass sampling direction x = z exp(alpha(z)) + mu(z)
               (Kingma et al. 2016, arXiv:1606.04934); orderings alternate natural / reverse
    planar     f(z) = z + u_hat tanh(w . z + b)                  (Rezende & Mohamed 2015,
    radial     f(z) = z + beta (z - z0) / (alpha + |z - z0|)      arXiv:1505.05770 §4.1)
    sylvester  f(z) = z + Q R tanh(R~ Q^T z + b), ``kind`` orthogonal (M = ``ortho_vectors``
               columns of Q, 0: D) | householder | triangular (alternating flips)
               (van den Berg et al. 2018, arXiv:1803.05649)

``context_features`` amortises planar and radial parameters (static + Linear(context)) and
conditions the MADEs of maf / iaf (the VAE's posterior flows); the other kinds take no context.
"""
from __future__ import annotations

from models.core.transform import Transform
from models.nets.made import MADE
from models.nets.realnvp_nets import MLPConditioner
from models.transforms.bijections import masks
from models.transforms.bijections.diagonal_scaling import DiagonalScaling
from models.transforms.bijections.masked_additive_coupling import MaskedAdditiveCoupling
from models.transforms.bijections.masked_affine_coupling import MaskedAffineCoupling
from models.transforms.vector.iaf import IAF
from models.transforms.vector.maf import MAF
from models.transforms.vector.planar import PlanarFlow
from models.transforms.vector.radial import RadialFlow
from models.transforms.vector.sylvester import SylvesterFlow

FLOWS = ("realnvp", "nice", "maf", "iaf", "planar", "radial", "sylvester")
SYLVESTER_KINDS = ("orthogonal", "householder", "triangular")
CONTEXT_FLOWS = ("maf", "iaf", "planar", "radial")  # the kinds that take a context


def vector_layers(flow: str, dim: int, steps: int, hidden_channels: int = 64, hidden_blocks: int = 2,
                  kind: str = "orthogonal", ortho_vectors: int = 0, context_features: int | None = None,
                  planar_init_scale: float = 0.5) -> list[Transform]:
    """``steps`` layers of kind ``flow`` on vectors of ``dim`` (NICE: plus its diagonal scaling)."""
    if flow not in FLOWS:
        raise ValueError(f"unknown vector flow {flow!r}; known: {', '.join(FLOWS)}")
    if kind not in SYLVESTER_KINDS:
        raise ValueError(f"unknown Sylvester kind {kind!r}; known: {', '.join(SYLVESTER_KINDS)}")
    if context_features and flow not in CONTEXT_FLOWS:
        raise ValueError(f"{flow} layers take no context (amortised kinds: {', '.join(CONTEXT_FLOWS)})")
    for key, value, low in (("steps", steps, 0), ("hidden_channels", hidden_channels, 1),
                            ("hidden_blocks", hidden_blocks, 1), ("ortho_vectors", ortho_vectors, 0)):
        if value < low:
            raise ValueError(f"{key} must be >= {low}, got {value}")
    if ortho_vectors > dim:
        raise ValueError(f"ortho_vectors = {ortho_vectors} exceeds the dimension {dim}")
    hidden = (hidden_channels,) * hidden_blocks
    out: list[Transform] = []
    for i in range(steps):
        if flow == "realnvp":
            out.append(MaskedAffineCoupling(MLPConditioner(dim, 2 * dim, hidden_channels, hidden_blocks),
                                            masks.alternating(dim, i)))
        elif flow == "nice":
            out.append(MaskedAdditiveCoupling(MLPConditioner(dim, dim, hidden_channels, hidden_blocks),
                                              masks.alternating(dim, i)))
        elif flow in ("maf", "iaf"):
            made = MADE(dim, hidden, ordering="natural" if i % 2 == 0 else "reverse", context_features=context_features)
            out.append(MAF(made) if flow == "maf" else IAF(made))
        elif flow == "planar":
            out.append(PlanarFlow(dim, context_features=context_features, init_scale=planar_init_scale))
        elif flow == "radial":
            out.append(RadialFlow(dim, context_features=context_features))
        else:
            out.append(SylvesterFlow(dim, kind, num_ortho_vecs=ortho_vectors or None, flip=bool(i % 2)))
    if flow == "nice":
        out.append(DiagonalScaling(dim))
    return out
