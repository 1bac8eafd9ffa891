"""Discrete Flows (Tran et al. 2019, "Discrete Flows: Invertible Generative Models of Discrete
Data", arXiv:1905.10347): a flow of bijections of categorical variables.

    x in {0..K-1}^(C x H x W), K = 2^data.n_bits  (K = 4 at data.n_bits=2, K = 2 binarized)
    -> one-hot (C, H, W, K)                                   (``OneHot``)
    -> steps x mod-K coupling  z = (mu + sigma x) mod K on the masked-out half, mu and sigma by
       straight-through argmax of a DenseNet's logits          (``ModularCoupling``, §2.2)
    -> learned factorized categorical base                     (``FactorizedCategorical``)

Every layer is a bijection of a finite set (ldj = 0), so

    log P(x) = log P_base(f(x))       exact; bits/dim = -log2 P(x) / (C H W)

with no dequantization (``dequantizer.kind`` is ``none``).  Masks alternate their parity each
step: ``checkerboard`` (spatial), ``channel`` (channel halves; needs C >= 2) or ``alternate``
(checkerboard, checkerboard, channel, channel, ...; checkerboard only when C = 1).
``scale: false`` keeps only the shift (location-only flows); ``tau`` is the temperature of the
straight-through softmax gradient; ``normalize_logits`` standardises each logit vector over its
classes before it (not in the paper; see ``modular_coupling``: without it the straight-through
gradient dies once the softmax saturates).  Conditioners: IDF's DenseNets (``hidden_blocks`` dense
layers growing by ``hidden_channels`` in all).
"""
from __future__ import annotations

from common.ranges import above, at_least
from models.builders.stack import LayerStack
from models.core.flow import Flow
from models.nets.densenet import DenseNet
from models.transforms.bijections import masks
from models.transforms.discrete.categorical_base import FactorizedCategorical
from models.transforms.discrete.modular_coupling import ModularCoupling, logit_channels
from models.transforms.discrete.one_hot import OneHot

DEFAULTS = {
    "steps": 4,               # mod-K coupling layers
    "hidden_channels": 64,    # total DenseNet growth of each conditioner
    "hidden_blocks": 2,       # dense layers per conditioner
    "mask": "alternate",      # checkerboard | channel | alternate
    "scale": True,            # sigma (a unit mod K) as well as the shift mu
    "tau": 1.0,               # straight-through temperature: backward is d softmax(logits / tau)
    "normalize_logits": True, # standardise each logit vector first (ours: keeps the softmax from saturating)
}
RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "steps": at_least(1), "hidden_channels": at_least(1), "hidden_blocks": at_least(1), "tau": above(0),
}
CHOICES = {"mask": ("alternate", "checkerboard", "channel")}

DEQUANTIZERS = ("none",)  # discrete: the flow permutes the categories themselves


def step_mask(kind: str, step: int, shape: tuple[int, int, int]):
    """The kept-elements mask (C, H, W) of coupling ``step``."""
    c, h, w = shape
    if kind == "alternate":
        kind = "checkerboard" if c == 1 or step % 4 < 2 else "channel"
    if kind == "channel" and c < 2:
        raise ValueError(f"model.mask=channel needs at least 2 channels, the data have {c}: use checkerboard or alternate")
    return getattr(masks, kind)(c, h, w, parity=step % 2)


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    """``dequantizer`` is ``{"kind": "none"}``: categories need no dequantizer."""
    if dequantizer.get("kind", "none") != "none":
        raise ValueError(f"discrete_flow takes no dequantizer (categorical data), got dequantizer.kind {dequantizer['kind']!r}")
    k = 2 ** num_bits
    c = data_shape[0]
    stack = LayerStack(data_shape).add(OneHot(k))
    for step in range(cfg["steps"]):
        net = DenseNet(c * k, c * logit_channels(k, cfg["scale"]), cfg["hidden_channels"], cfg["hidden_blocks"])
        stack.add(ModularCoupling(net, step_mask(cfg["mask"], step, data_shape), k, cfg["tau"], cfg["scale"],
                                  cfg["normalize_logits"]))
    return Flow(stack.transforms, FactorizedCategorical(stack.shape), data_shape)
