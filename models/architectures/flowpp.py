"""Flow++ (Ho et al. 2019): variational dequantization, logistic-mixture CDF couplings,
gated convolution + self-attention conditioners (official ``flows/run_cifar.py``).

    x (integers) -> dequantization (variational: a conditional flow q(u|x); or uniform)
    -> logit pre-processing (x * 0.9 + 0.05, logit: the official ImgProc; not after argmax)
    -> checkerboard split, steps[0] x [Norm, Pointwise, coupling, swap halves], merge
    -> squeeze
    -> channel split,      steps[1] x [same]
    -> checkerboard split, steps[2] x [same], merge
    -> N(0, I)

Norm is a per-element ActNorm (one scale and bias per element of each half, as the
official ``Norm``), Pointwise one invertible 1x1 conv per half (noisy-identity init).
A split stacks its two halves along channels (``checkerboard.py``), so the coupling
conditions on the first half and transforms the second, and swapping halves is the
official ``TupleFlip``.  The variational dequantizer is a checkerboard flow of
``dequant_steps`` such steps (``dequant_blocks`` blocks, conditioned on a context net)
followed by a sigmoid.  Squeeze uses the official (TensorFlow space_to_depth) channel
order, so the channel split halves are the top and bottom rows of each 2x2 block.

experiments/flowpp_cifar10.yaml: 31,443,440 parameters, as the official code.
"""
from __future__ import annotations

from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.flowpp_nets import DequantContextNet, FlowppCouplingNet
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.checkerboard import CheckerboardMerge, CheckerboardSplit
from models.transforms.bijections.conv1x1 import InvertibleConv1x1
from models.transforms.bijections.elementwise import Logit, Sigmoid
from models.transforms.bijections.halves import Halfwise, SwapHalves
from models.transforms.bijections.mixture_logistic import MixtureLogisticCoupling
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.argmax import ENCODINGS, ArgmaxSurjection
from models.transforms.surjections.conditional_noise import ConditionalNoise
from models.transforms.surjections.uniform_dequantization import UniformDequantization
from models.transforms.surjections.variational_dequantization import VariationalDequantization

DEFAULTS = {
    "steps": [4, 2, 3],        # checkerboard steps, (squeeze) channel steps, checkerboard steps
    "filters": 96,
    "blocks": 10,
    "heads": 4,
    "components": 32,          # logistics per mixture; 0 = affine coupling (ablation)
    "attention": True,         # False: pointwise gated NIN instead (ablation)
    "dropout": 0.2,
    "logit_alpha": 0.05,       # pre-processing x * (1 - 2 alpha) + alpha, then logit
    "dequantization": "variational",  # variational | uniform | argmax (binary encoding, no logit)
    "dequant_steps": 4,        # the dequantizer shares heads, components, attention and dropout
    "dequant_filters": 96,
    "dequant_blocks": 2,
    "context_channels": 32,
    "context_blocks": 3,
}

CHOICES = {"dequantization": ("variational", "uniform", "argmax")}


def flow_steps(n: int, shape: tuple[int, int, int], cfg: dict, filters: int, blocks: int, context_channels: int = 0):
    """n x [per-element ActNorm, per-half 1x1 conv, coupling, swap halves] on a stacked split of ``shape``."""
    c, h, w = shape
    half = c // 2
    out = []
    for _ in range(n):
        net = FlowppCouplingNet(half, half * (2 + 3 * cfg["components"]), (h, w), filters, blocks, cfg["heads"],
                                cfg["dropout"], context_channels, cfg["attention"])
        out += [ActNorm(c, spatial_shape=(h, w)),
                Halfwise(InvertibleConv1x1(half, "noisy_identity"), InvertibleConv1x1(half, "noisy_identity")),
                MixtureLogisticCoupling(net, half, cfg["components"]),
                SwapHalves()]
    return out


def build_dequantization(kind: str, data_shape: tuple[int, int, int], num_bits: int, *, steps: int = 4,
                         filters: int = 96, blocks: int = 2, heads: int = 4, components: int = 32,
                         attention: bool = True, dropout: float = 0.0, context_channels: int = 32,
                         context_blocks: int = 3, encoding: str = "binary"):
    """``kind`` = uniform; variational: Flow++'s dequantizer (the defaults are the paper's:
    4 checkerboard steps of 2 blocks, 96 filters, 32 logistics, a 32-channel context net of
    3 gated convs); or argmax: the 2^num_bits values as categories (``encoding`` binary or
    onehot, see ``argmax.py``) with the same conditional flow, without the final sigmoid,
    for the noise.  Any architecture selects it with ``model.dequantization``."""
    if kind == "uniform":
        return UniformDequantization(num_bits)
    if kind not in ("variational", "argmax"):
        raise ValueError(f"unknown dequantization {kind!r}; use uniform, variational or argmax")
    c, h, w = data_shape
    if w % 2:
        raise ValueError(f"{kind} dequantization needs an even image width, got {w}")
    net_cfg = {"components": components, "heads": heads, "dropout": dropout, "attention": attention}
    code = ENCODINGS[encoding](2 ** int(num_bits)) if kind == "argmax" else None
    ch = c * code.dims if code is not None else c  # channels of the noise
    flow = [CheckerboardSplit(), *flow_steps(steps, (2 * ch, h, w // 2), net_cfg, filters, blocks, context_channels),
            CheckerboardMerge()]
    context_net = DequantContextNet(ch, context_channels, context_blocks, dropout)
    if code is not None:
        return ArgmaxSurjection(code, ConditionalNoise(flow, context_net, ch))
    return VariationalDequantization(flow + [Sigmoid()], context_net, num_bits)


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int) -> Flow:
    c, h, w = data_shape
    if h % 4 or w % 4:
        raise ValueError(f"image size {h}x{w} must be divisible by 4 (checkerboard split after a squeeze)")
    if len(cfg["steps"]) != 3:
        raise ValueError("model.steps needs 3 numbers: checkerboard, channel and checkerboard steps")
    n1, n2, n3 = cfg["steps"]
    deq = build_dequantization(cfg["dequantization"], data_shape, num_bits, steps=cfg["dequant_steps"],
                               filters=cfg["dequant_filters"], blocks=cfg["dequant_blocks"], heads=cfg["heads"],
                               components=cfg["components"], attention=cfg["attention"], dropout=cfg["dropout"],
                               context_channels=cfg["context_channels"], context_blocks=cfg["context_blocks"])
    # argmax already gives unbounded reals (C * code dims channels): no logit pre-processing
    transforms = [deq] if cfg["dequantization"] == "argmax" else [deq, Logit(cfg["logit_alpha"])]
    c = deq.output_shape(data_shape)[0]
    f, b = cfg["filters"], cfg["blocks"]
    transforms += [CheckerboardSplit(), *flow_steps(n1, (2 * c, h, w // 2), cfg, f, b), CheckerboardMerge()]
    transforms.append(Squeeze(order="tf"))
    transforms += flow_steps(n2, (4 * c, h // 2, w // 2), cfg, f, b)
    transforms += [CheckerboardSplit(), *flow_steps(n3, (8 * c, h // 2, w // 4), cfg, f, b), CheckerboardMerge()]
    return Flow(transforms, StandardNormal((4 * c, h // 2, w // 2)), data_shape)
