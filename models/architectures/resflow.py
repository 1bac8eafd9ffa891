"""Residual Flows (Chen et al. 2019, arXiv:1906.02735) and i-ResNet (Behrmann et al. 2019,
arXiv:1811.00995) as Flows.

    x (integers) -> dequantizer (``dequantizer.kind``: uniform, the paper's; variational; argmax)
    -> logit(alpha + (1 - 2 alpha) y), alpha = 0.05     (y in [0, 1); no logit after argmax)
    [ActNorm]                                           (first_resblock: before the first block)
    for scale s = 1..S (S = len(steps)):
        steps[s] x [iResBlock(conv net 3-1-3, hidden_channels) -> ActNorm]
        squeeze (not after the last scale)
    fc_end: fc_steps x [iResBlock(fully connected net, fc_hidden_channels) -> element-wise ActNorm]
    base: N(0, I)                                       (no factor-out: CIFAR-10 official)

With steps [16, 16, 16], 512 hidden channels, LipSwish, coeff 0.98 and 4 FC blocks of
128 this is the official CIFAR-10 model (rtqichen/residual-flows ``train_img.py``
defaults): 25,174,129 parameters here, 25,174,233 in the
official code, which also registers the roulette settings (``lamb`` and ``geom_p``) of
each of its 52 blocks as ``nn.Parameter``s (2 x 52 = 104 scalars that never receive a
gradient); here they are config floats.

The model is a plain :class:`Flow`; the hooks live on ``InvertibleResidualBlock``:
``data_init`` (power iterations to tolerance, before ActNorm's init), ``after_optimizer_step``
(power iterations of every spectrally normalised layer of its net, see
``models.nets.lipschitz`` for why that keeps ranks identical) and ``diagnostics``
(roulette terms of the last forward, fixed-point iterations and residual of the last
inverse, power iterations and the largest normalised sigma).
"""
from __future__ import annotations

import math

from common.ranges import above, at_least, between, each
from models.builders.dequantizer import build_dequantizer
from models.builders.stack import LayerStack
from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.resflow_nets import ConvResidualNet, FCResidualNet
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.residual.iresblock import InvertibleResidualBlock

DEFAULTS = {
    "steps": [16, 16, 16],         # residual blocks per scale (squeeze between scales)
    "hidden_channels": 512,        # idim of the conv nets
    "kernels": "3-1-3",            # kernel sizes of the conv net's layers
    "activation": "lipswish",      # lipswish | elu | relu
    "preact": True,                # activation before the first conv (not for the model's first block)
    "first_resblock": True,        # ActNorm before the first block, no pre-activation in it
    "actnorm": True,               # ActNorm after every block
    "fc_end": True,                # fully connected blocks at the end of the last scale
    "fc_steps": 4,                 # fully connected residual blocks at the end ...
    "fc_hidden_channels": 128,     # ... and their hidden width
    "coeff": 0.98,                 # Lipschitz coefficient of every linear/conv layer
    "lipschitz_norm": "2",         # p of the induced norms (1..9, i = inf): one for every layer boundary ("2": spectral
                                   # norms), or one per boundary for mixed norms (the official vnorms, e.g. "2332")
    "sn_atol": 1e-3,               # power iteration stops at this tolerance ...
    "sn_rtol": 1e-3,
    "sn_max_iters": 2000,          # ... or this many iterations (tolerances 0: exactly this many)
    "estimator": "roulette",       # roulette (unbiased) | truncated (i-ResNet, biased) | exact (tiny inputs)
    "roulette_dist": "poisson",    # poisson | geometric
    "poisson_lambda": 2.0,
    "geometric_p": 0.5,
    "n_exact_terms": 2,            # exact terms before the roulette tail, training
    "n_exact_terms_eval": 20,      # ... in eval mode (test bits/dim)
    "n_power_series": 5,           # terms of the truncated estimator
    "neumann_grad": True,          # Neumann-series gradient of the log-det
    "mem_efficient": True,         # log-det gradient computed in the forward pass
    "logit_alpha": 0.05,
    "inverse_atol": 1e-5,          # fixed-point inverse tolerance ...
    "inverse_rtol": 1e-5,
    "inverse_max_iters": 100,      # ... and iteration cap
}

RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "steps": each(at_least(0), min_length=1), "hidden_channels": at_least(1), "fc_steps": at_least(0),
    "fc_hidden_channels": at_least(1), "coeff": above(0), "sn_atol": at_least(0), "sn_rtol": at_least(0),
    "sn_max_iters": at_least(1), "poisson_lambda": above(0), "geometric_p": between(0, 1, lo_open=True, hi_open=True),
    "n_exact_terms": at_least(0), "n_exact_terms_eval": at_least(0), "n_power_series": at_least(1),
    "logit_alpha": between(0, 0.5, hi_open=True), "inverse_atol": at_least(0), "inverse_rtol": at_least(0),
    "inverse_max_iters": at_least(1),
}

CHOICES = {
    "activation": ("lipswish", "elu", "relu"),
    "estimator": ("roulette", "truncated", "exact"),
    "roulette_dist": ("poisson", "geometric"),
}

DEQUANTIZERS = ("uniform", "variational", "argmax")


def _block(cfg: dict, net) -> InvertibleResidualBlock:
    return InvertibleResidualBlock(
        net, estimator=cfg["estimator"], dist=cfg["roulette_dist"], poisson_lambda=cfg["poisson_lambda"],
        geometric_p=cfg["geometric_p"], n_exact=cfg["n_exact_terms"], n_exact_eval=cfg["n_exact_terms_eval"],
        n_terms=cfg["n_power_series"], neumann_grad=cfg["neumann_grad"], mem_efficient=cfg["mem_efficient"],
        inverse_atol=cfg["inverse_atol"], inverse_rtol=cfg["inverse_rtol"], inverse_max_iters=cfg["inverse_max_iters"])


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    blocks = list(cfg["steps"])
    if not blocks or any(not isinstance(n, int) or n < 0 for n in blocks):
        raise ValueError(f"model.steps must be a non-empty list of block counts per scale, got {blocks}")
    try:
        kernels = tuple(int(k) for k in str(cfg["kernels"]).split("-"))
    except ValueError:
        raise ValueError(f"model.kernels must look like '3-1-3', got {cfg['kernels']!r}") from None
    if len(kernels) < 2 or any(k % 2 == 0 for k in kernels):
        raise ValueError(f"model.kernels needs at least two odd kernel sizes, got {cfg['kernels']!r}")
    _, h, w = data_shape
    n_squeeze = len(blocks) - 1
    if h % 2 ** n_squeeze or w % 2 ** n_squeeze:
        raise ValueError(f"image size {h}x{w} is not divisible by 2^{n_squeeze} (one squeeze between scales)")
    vnorms = str(cfg["lipschitz_norm"])
    vnorms = vnorms * (len(kernels) + 1) if len(vnorms) == 1 else vnorms
    if len(vnorms) != len(kernels) + 1 or not all(ch in "123456789i" for ch in vnorms) or vnorms[0] != vnorms[-1]:
        raise ValueError(f"model.lipschitz_norm must be one or {len(kernels) + 1} characters in 1..9 or i (inf), the "
                         f"first equal to the last, got {cfg['lipschitz_norm']!r}")
    sn = {"coeff": cfg["coeff"], "atol": cfg["sn_atol"], "rtol": cfg["sn_rtol"], "max_iters": cfg["sn_max_iters"],
          "norms": tuple(math.inf if ch == "i" else float(ch) for ch in vnorms)}
    stack = LayerStack(data_shape).add(build_dequantizer(dequantizer, data_shape, num_bits))
    if dequantizer["kind"] != "argmax":  # argmax gives unbounded reals already
        stack.add(Logit(cfg["logit_alpha"]))
    first = cfg["first_resblock"]
    if first and cfg["actnorm"]:
        stack.add(ActNorm(stack.shape[0]))
    for scale, n_blocks in enumerate(blocks):
        for i in range(n_blocks):
            preact = cfg["preact"] and not (first and scale == 0 and i == 0)
            net = ConvResidualNet(stack.shape, cfg["hidden_channels"], kernels, cfg["activation"], preact, **sn)
            stack.add(_block(cfg, net))
            if cfg["actnorm"]:
                stack.add(ActNorm(stack.shape[0]))
        if scale < len(blocks) - 1:
            stack.add(Squeeze())
    if cfg["fc_end"]:
        for _ in range(cfg["fc_steps"]):
            net = FCResidualNet(stack.shape, cfg["fc_hidden_channels"], len(kernels), cfg["activation"], cfg["preact"],
                                **sn)
            stack.add(_block(cfg, net))
            if cfg["actnorm"]:
                stack.add(ActNorm(stack.shape[0], spatial_shape=tuple(stack.shape[1:])))
    transforms, shape = stack.transforms, stack.shape
    return Flow(transforms, StandardNormal(shape), data_shape)
