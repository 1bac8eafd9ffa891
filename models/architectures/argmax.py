"""Argmax flows for categorical images (Hoogeboom et al. 2021, arXiv:2102.05379; SurVAE Flows,
Nielsen et al. 2020, arXiv:2007.02731).

Every sub-pixel is a category in {0, ..., K-1}, K = 2^data.n_bits (256 for CIFAR-10; 2 for
Fashion-MNIST at n_bits=1, i.e. binarized at 128; 4 or 8 colour levels at n_bits=2 or 3):

    x (categories) -> argmax surjection: z ~ q(z | x) with decode(z) = x, ldj = -log q(z | x)
                      (``dequantizer.kind: argmax``, the only kind here; ``dequantizer.encoding``
                       binary: ceil(log2 K) dims per sub-pixel, signs = bits; onehot: K dims,
                       argmax = x; noise from Flow++'s conditional checkerboard mixture-logistic
                       flow, the other ``dequantizer`` knobs)
    -> Glow's levels (squeeze, steps x [ActNorm, 1x1 conv, coupling], split) -> learned top prior

It is Glow (``models.builders.glow_levels``) on the argmax dequantizer, with defaults sized
for the wider encoded input and a small noise flow.  log_prob is the variational bound
E_q[log p(z) - log q(z | x)] <= log P(x) in nats of the discrete data; bits/dim divide by
C*H*W of the data (not of the encoding).
"""
from __future__ import annotations

from common.ranges import at_least
from models.builders import glow_levels
from models.builders.dequantizer import build_dequantizer
from models.builders.stack import LayerStack
from models.core.flow import Flow

DEFAULTS = {
    # the backbone: Glow's levels (see models/builders/glow_levels.py)
    "levels": 3,
    "steps": 8,
    "hidden_channels": 256,
    "coupling": "affine",
    "permutation": "conv1x1",
    "learn_top": True,
    "edge_padding": True,
}
RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "levels": at_least(1), "steps": at_least(1), "hidden_channels": at_least(1),
}

CHOICES = dict(glow_levels.CHOICES)

DEQUANTIZERS = ("argmax",)
# q(v | x): a small Flow++ conditional flow (checkerboard logistic-mixture couplings + context net)
DEQUANTIZER_DEFAULTS = {"steps": 2, "hidden_channels": 64, "hidden_blocks": 1, "components": 8, "context_blocks": 2}


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    stack = LayerStack(data_shape).add(build_dequantizer(dequantizer, data_shape, num_bits))
    base = glow_levels.add_levels(stack, cfg)
    return Flow(stack.transforms, base, data_shape)
