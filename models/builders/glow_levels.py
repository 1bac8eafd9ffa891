"""Glow's multi-scale levels (Kingma & Dhariwal 2018, arXiv:1807.03039), shared by the glow
and argmax families:

    for level in 1..L (``levels``):
        squeeze  (C, H, W) -> (4C, H/2, W/2)
        K (``steps``) x [ActNorm -> invertible 1x1 conv (or a fixed permutation) -> coupling]
        split: factor out half the channels with a learned conditional Gaussian (not at level L)
    top prior: learned Gaussian (``learn_top``) or N(0, I)

Couplings (``coupling``): affine, z2 = (x2 + t(x1)) * sigmoid(h(x1) + 2), or additive,
z2 = x2 + t(x1); the networks are Glow's 3x3 -> 1x1 -> zero-init 3x3 convs of
``hidden_channels`` (``edge_padding``: the official extra is-padding channel).  The split
priors and the learned top prior are zero-initialised convs.
"""
from __future__ import annotations

from models.builders.stack import LayerStack
from models.core.distributions import Distribution, LearnedGaussian, StandardNormal
from models.nets.glow_nets import GlowCouplingNet, ZeroConv2d
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.conv1x1 import InvertibleConv1x1, InvertibleConv1x1LU
from models.transforms.bijections.coupling import AdditiveCoupling, AffineCoupling
from models.transforms.bijections.permutation import ChannelPermutation
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.split import Split

CHOICES = {
    "coupling": ("affine", "additive"),
    "permutation": ("conv1x1", "conv1x1_lu", "reverse", "shuffle"),
}


def _permutation(kind: str, channels: int):
    return {
        "conv1x1": lambda: InvertibleConv1x1(channels),
        "conv1x1_lu": lambda: InvertibleConv1x1LU(channels),
        "reverse": lambda: ChannelPermutation.reverse(channels),
        "shuffle": lambda: ChannelPermutation.shuffle(channels),
    }[kind]()


def flow_step(cfg: dict, channels: int) -> list:
    """ActNorm, permutation and coupling on ``channels`` channels."""
    half = channels // 2
    hidden, edge = cfg["hidden_channels"], cfg["edge_padding"]
    if cfg["coupling"] == "affine":
        coupling = AffineCoupling(GlowCouplingNet(half, 2 * (channels - half), hidden, edge), half)
    else:
        coupling = AdditiveCoupling(GlowCouplingNet(half, channels - half, hidden, edge), half)
    return [ActNorm(channels), _permutation(cfg["permutation"], channels), coupling]


def add_levels(stack: LayerStack, cfg: dict) -> Distribution:
    """Append Glow's levels to ``stack`` (on its current shape); returns the top prior.

    ``cfg`` holds ``levels``, ``steps``, ``hidden_channels``, ``coupling``, ``permutation``,
    ``learn_top`` and ``edge_padding``."""
    _, h, w = stack.shape
    if h % 2 ** cfg["levels"] or w % 2 ** cfg["levels"]:
        raise ValueError(f"image size {h}x{w} is not divisible by 2^levels = {2 ** cfg['levels']}")
    for level in range(cfg["levels"]):
        stack.add(Squeeze())
        for _ in range(cfg["steps"]):
            stack.add(*flow_step(cfg, stack.shape[0]))
        if level < cfg["levels"] - 1:
            c = stack.shape[0]
            keep = c // 2
            stack.add(Split(ZeroConv2d(keep, 2 * (c - keep), 3, cfg["edge_padding"]), keep))
    c = stack.shape[0]
    if cfg["learn_top"]:
        return LearnedGaussian(stack.shape, ZeroConv2d(2 * c, 2 * c, 3, cfg["edge_padding"]))
    return StandardNormal(stack.shape)
