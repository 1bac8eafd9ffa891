"""Glow (Kingma & Dhariwal 2018, arXiv:1807.03039): multi-scale flow of ActNorm, 1x1 conv and coupling.

    x (integers) -> dequantizer (``dequantizer.kind``: uniform, the paper's; variational;
                    or argmax, binary-encoded categories) -> y - 0.5 (not after argmax,
                    whose output is already centred on 0)
    for level in 1..L:  squeeze -> K x [ActNorm -> 1x1 conv -> coupling] -> split (not at level L)
    top prior: learned Gaussian (``learn_top``) or N(0, I)

(``models.builders.glow_levels``; L = ``levels``, K = ``steps``.)  The split priors are
learned conditional Gaussians from a zero-initialised conv.  With L=3, K=32, 512 hidden
channels and affine coupling this is the official CIFAR-10 model (44.6M parameters).
"""
from __future__ import annotations

from common.ranges import at_least
from models.builders import glow_levels
from models.builders.dequantizer import build_dequantizer
from models.builders.stack import LayerStack
from models.core.flow import Flow
from models.transforms.bijections.elementwise import ScaleShift

DEFAULTS = {
    "levels": 3,               # L
    "steps": 32,               # K steps per level
    "hidden_channels": 512,    # width of the coupling networks
    "coupling": "affine",      # affine | additive
    "permutation": "conv1x1",  # conv1x1 | conv1x1_lu | reverse | shuffle
    "learn_top": True,         # learned top prior (else N(0, I))
    "edge_padding": True,      # is-padding channel on 3x3 convs, as the official code
}
RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "levels": at_least(1), "steps": at_least(1), "hidden_channels": at_least(1),
}

CHOICES = dict(glow_levels.CHOICES)

DEQUANTIZERS = ("uniform", "variational", "argmax")  # variational / argmax: the Flow++ paper's q by default


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    stack = LayerStack(data_shape).add(build_dequantizer(dequantizer, data_shape, num_bits))
    if dequantizer["kind"] != "argmax":
        stack.add(ScaleShift(1.0, -0.5))  # dequantized images in [0, 1) are centred by -0.5
    base = glow_levels.add_levels(stack, cfg)
    return Flow(stack.transforms, base, data_shape)
