"""Multi-scale RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803, §3.6 and §4.1).

    x (integers) -> dequantizer (``dequantizer.kind``: uniform, the paper's; variational; argmax)
    -> logit(alpha + (1 - 2 alpha) y), alpha = 0.05    (y in [0, 1); no logit after argmax)
    for scale in 1..L-1 (L = ``levels``):
        3 x [checkerboard affine coupling -> batch norm]      (mask parity alternates)
        squeeze  (C, H, W) -> (4C, H/2, W/2)
        3 x [channel affine coupling -> batch norm]           (mask parity alternates)
        factor out half the channels to N(0, I)              (``Split`` with a zero prior)
    last scale: 4 x [checkerboard affine coupling -> batch norm]
    base: N(0, I)

Couplings: z = b x + (1 - b)(x exp(s) + t), s = scale * tanh(.), with ResNet conditioners
(``hidden_blocks`` residual blocks of ``hidden_channels`` feature maps, batch norm, optional
weight norm).  The paper's CIFAR-10 model uses 8 blocks x 64 features and "downscales only
once" (``levels: 2``).  Batch norm layers are RealNVP's bijector: batch statistics in
training, running averages in evaluation (the trainer switches modes).
"""
from __future__ import annotations

from common.ranges import at_least, between
from models.builders.dequantizer import build_dequantizer
from models.builders.stack import LayerStack
from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.glow_nets import ZeroConv2d
from models.nets.realnvp_nets import ResNetConditioner, ZeroPrior
from models.transforms.bijections import masks
from models.transforms.bijections.batch_norm import BatchNormBijection
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.masked_affine_coupling import MaskedAffineCoupling
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.split import Split

DEFAULTS = {
    "levels": 2,                # L: squeeze + factor-out happen L - 1 times
    "hidden_blocks": 8,         # residual blocks per conditioner
    "hidden_channels": 64,      # feature maps per residual block
    "weight_norm": True,        # weight normalisation on the conditioner convs
    "batch_norm": True,         # batch-norm bijector after every coupling
    "bn_momentum": 0.05,        # running-average momentum of the batch-norm bijector
    "logit_alpha": 0.05,        # RealNVP's pre-processing constant
    "factor_out_prior": "standard",  # standard (paper: N(0, I)) | learned (Glow's conditional prior)
}

RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "levels": at_least(1), "hidden_blocks": at_least(1), "hidden_channels": at_least(1),
    "bn_momentum": between(0, 1, lo_open=True), "logit_alpha": between(0, 0.5, hi_open=True),
}

CHOICES = {
    "factor_out_prior": ("standard", "learned"),
}

DEQUANTIZERS = ("uniform", "variational", "argmax")


def _coupling(cfg: dict, mask, shape):
    c = shape[0]
    net = ResNetConditioner(c, 2 * c, cfg["hidden_channels"], cfg["hidden_blocks"], cfg["weight_norm"])
    layers = [MaskedAffineCoupling(net, mask)]
    if cfg["batch_norm"]:
        layers.append(BatchNormBijection(c, momentum=cfg["bn_momentum"]))
    return layers


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    _, h, w = data_shape
    levels = cfg["levels"]
    if levels < 1:
        raise ValueError("RealNVP needs levels >= 1")
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ValueError(f"image size {h}x{w} is not divisible by 2^(levels-1) = {2 ** (levels - 1)}")
    stack = LayerStack(data_shape).add(build_dequantizer(dequantizer, data_shape, num_bits))
    if dequantizer["kind"] != "argmax":  # argmax gives unbounded reals already
        stack.add(Logit(cfg["logit_alpha"]))
    for _ in range(levels - 1):
        for i in range(3):
            stack.add(*_coupling(cfg, masks.checkerboard(*stack.shape, parity=i), stack.shape))
        stack.add(Squeeze())
        for i in range(3):
            stack.add(*_coupling(cfg, masks.channel(*stack.shape, parity=i), stack.shape))
        c = stack.shape[0]
        keep = c // 2
        prior = (ZeroPrior(2 * (c - keep)) if cfg["factor_out_prior"] == "standard"
                 else ZeroConv2d(keep, 2 * (c - keep), 3, True))
        stack.add(Split(prior, keep))
    for i in range(4):
        stack.add(*_coupling(cfg, masks.checkerboard(*stack.shape, parity=i), stack.shape))
    return Flow(stack.transforms, StandardNormal(stack.shape), data_shape)
