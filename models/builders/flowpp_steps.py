"""Flow++'s coupling steps (Ho et al. 2019, arXiv:1902.00275 §3), on a stacked split.

One step on an input (C, H, W) whose channel halves are the two parts of a split
(``CheckerboardSplit`` stacks a checkerboard's halves along channels, a channel split needs
no layer):

    per-element ActNorm (the official ``Norm``)
    -> one invertible 1x1 conv per half (noisy-identity init, the official ``Pointwise``)
    -> logistic-mixture CDF coupling of the second half given the first
       (``components`` logistics; 0 = affine coupling z = x * exp(tanh(s)) + t)
    -> swap halves (the official ``TupleFlip``)

The coupling network is ``FlowppCouplingNet``: ``hidden_blocks`` gated conv + (gated
self-attention with ``heads`` heads, or pointwise gated NIN when ``attention`` is off)
blocks of width ``hidden_channels``, conditioned on a context of ``context_channels``
(0: none; the conditional dequantizer flow's context net).  Used by the Flow++ family and
by ``models.builders.dequantizer`` for q(u | x).
"""
from __future__ import annotations

from models.nets.flowpp_nets import FlowppCouplingNet
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.conv1x1 import InvertibleConv1x1
from models.transforms.bijections.halves import Halfwise, SwapHalves
from models.transforms.bijections.mixture_logistic import MixtureLogisticCoupling


def flow_steps(n: int, shape: tuple[int, int, int], cfg: dict, context_channels: int = 0) -> list:
    """``n`` steps on a stacked split of ``shape``; ``cfg`` holds the glossary knobs
    ``hidden_channels``, ``hidden_blocks``, ``heads``, ``components``, ``attention``, ``dropout``."""
    c, h, w = shape
    half = c // 2
    k = cfg["components"]
    out = []
    for _ in range(n):
        net = FlowppCouplingNet(half, half * (2 + 3 * k), (h, w), cfg["hidden_channels"], cfg["hidden_blocks"],
                                cfg["heads"], cfg["dropout"], context_channels, cfg["attention"])
        out += [ActNorm(c, spatial_shape=(h, w)),
                Halfwise(InvertibleConv1x1(half, "noisy_identity"), InvertibleConv1x1(half, "noisy_identity")),
                MixtureLogisticCoupling(net, half, k),
                SwapHalves()]
    return out
