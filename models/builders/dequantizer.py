"""The dequantizer: one surjection from integer images to the data a continuous flow models,
configured by the top-level ``dequantizer:`` section for every continuous family.

Images x in {0, ..., K-1}^D, K = 2^n_bits (D = C*H*W).  Each kind is a surjection whose
``ldj`` is its likelihood term (SurVAE Flows, arXiv:2007.02731), so for every kind

    E_q[log p(y) + ldj] <= log P(x)        (the single-sample variational bound)

and ``Flow.log_prob_iw`` gives the importance-weighted one:

    uniform      y = (x + u) / K,  u ~ U(0, 1)^D,          ldj = -D log K
                 (Theis et al. 2016, arXiv:1511.01844); y in [0, 1)^D, C channels
    variational  y = (x + u) / K,  u ~ q(u | x),           ldj = -D log K - log q(u | x)
                 q: eps ~ N(0, I) through ``steps`` checkerboard logistic-mixture coupling
                 steps conditioned on a context net of x, then a sigmoid into (0, 1)
                 (Flow++, arXiv:1902.00275 §3.2); y in [0, 1)^D, C channels
    argmax       every value a category of K, z ~ q(z | x) with decode(z) = x,  ldj = -log q(z | x)
                 (Argmax Flows, arXiv:2102.05379): ``encoding`` binary (ceil(log2 K) dims per
                 sub-pixel, z_j = +-softplus(v_j) by bit j) or onehot (K dims, z_x = v_x,
                 z_i = z_x - softplus(z_x - v_i)); v ~ q(v | x) from the same conditional flow
                 without the sigmoid; z real, C * dims channels
    none         no dequantizer: the discrete families (IDF) model the integers themselves

Knobs of the conditional flow (variational and argmax; unused by uniform), named as in the
README's config glossary: ``steps`` coupling steps, ``hidden_channels`` / ``hidden_blocks``
width and depth of each coupling network, ``components`` logistics per mixture (0: affine),
``heads``, ``attention``, ``dropout``; ``context_channels`` / ``context_blocks`` width and
depth of the context net (a conv on the checkerboard-split features of x, then gated convs).
The defaults are the Flow++ paper's dequantizer.

A family module states the kinds it supports, ``DEQUANTIZERS`` (the first is its default),
and may override knob defaults with ``DEQUANTIZER_DEFAULTS``; what follows the dequantizer
(Glow's shift by -1/2, the logit of Flow++ / RealNVP / FFJORD / Residual Flows: none after
argmax, whose output is already unbounded) is the family's.  A family whose only kind is
``none`` has the section ``{kind: none}`` and accepts no other key.
"""
from __future__ import annotations

from models.builders.flowpp_steps import flow_steps
from common.ranges import at_least, between
from models.builders.stack import LayerStack
from models.core.transform import Transform
from models.nets.flowpp_nets import DequantContextNet
from models.transforms.bijections.checkerboard import CheckerboardMerge, CheckerboardSplit
from models.transforms.bijections.elementwise import Sigmoid
from models.transforms.surjections.argmax import ENCODINGS, ArgmaxSurjection
from models.transforms.surjections.conditional_noise import ConditionalNoise
from models.transforms.surjections.uniform_dequantization import UniformDequantization
from models.transforms.surjections.variational_dequantization import VariationalDequantization

KINDS = ("uniform", "variational", "argmax")  # the continuous kinds
NONE = "none"                                 # the discrete families' only kind

DEFAULTS = {
    "kind": "uniform",         # uniform | variational | argmax (a family's default: the first of its DEQUANTIZERS)
    "steps": 4,                # checkerboard coupling steps of q
    "hidden_channels": 96,     # width of q's coupling networks
    "hidden_blocks": 2,        # gated conv + attention blocks per coupling network
    "components": 32,          # logistics per mixture CDF; 0 = affine coupling
    "heads": 4,
    "attention": True,         # False: pointwise gated NIN instead of self-attention
    "dropout": 0.0,
    "context_channels": 32,    # context net: conv to this many channels ...
    "context_blocks": 3,       # ... then this many gated convs
    "encoding": "binary",      # argmax only: binary | onehot
}

CHOICES = {
    "kind": KINDS,
    "encoding": tuple(ENCODINGS),
}

RANGES = {  # valid values of the numeric knobs (engine.config checks them)
    "steps": at_least(1), "hidden_channels": at_least(1), "hidden_blocks": at_least(1),
    "components": at_least(0), "heads": at_least(1), "dropout": between(0, 1, hi_open=True),
    "context_channels": at_least(1), "context_blocks": at_least(0),
}


def section(kinds: tuple[str, ...], overrides: dict | None = None) -> tuple[dict, dict]:
    """Defaults and choices of the ``dequantizer`` section for a family supporting ``kinds``
    (its first entry the default kind) with knob defaults ``overrides``."""
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS + (NONE,) for k in kinds) or (NONE in kinds and len(kinds) > 1):
        raise ValueError(f"a family's DEQUANTIZERS must be kinds out of {KINDS} or just ({NONE!r},), got {kinds}")
    if kinds == (NONE,):
        return {"kind": NONE}, {"kind": kinds}
    overrides = dict(overrides or {})
    unknown = set(overrides) - (set(DEFAULTS) - {"kind"})
    if unknown:
        raise ValueError(f"unknown dequantizer default(s) {sorted(unknown)}")
    return {**DEFAULTS, **overrides, "kind": kinds[0]}, {**CHOICES, "kind": kinds}


def build_dequantizer(deq_cfg: dict, data_shape: tuple[int, int, int], num_bits: int) -> Transform:
    """The dequantizer of a resolved ``dequantizer`` section (missing knobs take ``DEFAULTS``)
    for integer images of ``data_shape`` with ``num_bits`` bits."""
    cfg = {**DEFAULTS, **deq_cfg}
    kind = cfg["kind"]
    if kind == "uniform":
        return UniformDequantization(num_bits)
    if kind not in KINDS:
        raise ValueError(f"unknown dequantizer.kind {kind!r}; use one of {', '.join(KINDS)}")
    c, h, w = data_shape
    if w % 2:
        raise ValueError(f"{kind} dequantization needs an even image width, got {w}")
    code = ENCODINGS[cfg["encoding"]](2 ** int(num_bits)) if kind == "argmax" else None
    ch = c * code.dims if code is not None else c  # channels of the noise
    flow = LayerStack((ch, h, w)).add(CheckerboardSplit())
    flow.add(*flow_steps(cfg["steps"], flow.shape, cfg, cfg["context_channels"]))
    flow.add(CheckerboardMerge())
    context_net = DequantContextNet(ch, cfg["context_channels"], cfg["context_blocks"], cfg["dropout"])
    if code is not None:
        return ArgmaxSurjection(code, ConditionalNoise(flow.transforms, context_net, ch))
    return VariationalDequantization(flow.transforms + [Sigmoid()], context_net, num_bits)
