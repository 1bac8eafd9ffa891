"""Glow (Kingma & Dhariwal 2018): multi-scale flow of ActNorm, 1x1 conv and coupling.

    x (integers) -> uniform dequantization -> x/2^n - 0.5    (or ``model.dequantization``:
                    variational, or argmax -- binary-encoded categories, no shift)
    for level in 1..L:  squeeze -> K x [ActNorm -> 1x1 conv -> coupling] -> split (not at level L)
    top prior: learned Gaussian (``learn_top``) or N(0, I)

The split priors are learned conditional Gaussians from a zero-initialised conv.
With L=3, K=32, 512 hidden channels and affine coupling this is the official
CIFAR-10 model (44.6M parameters).
"""
from __future__ import annotations

from models.architectures.flowpp import build_dequantization
from models.core.distributions import LearnedGaussian, StandardNormal
from models.core.flow import Flow
from models.nets.glow_nets import GlowCouplingNet, ZeroConv2d
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.conv1x1 import InvertibleConv1x1, InvertibleConv1x1LU
from models.transforms.bijections.coupling import AdditiveCoupling, AffineCoupling
from models.transforms.bijections.elementwise import ScaleShift
from models.transforms.bijections.permutation import ChannelPermutation
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.split import Split

DEFAULTS = {
    "levels": 3,               # L
    "depth": 32,               # K steps per level
    "hidden_channels": 512,    # width of the coupling networks
    "coupling": "affine",      # affine | additive
    "permutation": "conv1x1",  # conv1x1 | conv1x1_lu | reverse | shuffle
    "learn_top": True,         # learned top prior (else N(0, I))
    "edge_padding": True,      # is-padding channel on 3x3 convs, as the official code
    "dequantization": "uniform",
}

CHOICES = {
    "coupling": ("affine", "additive"),
    "permutation": ("conv1x1", "conv1x1_lu", "reverse", "shuffle"),
    "dequantization": ("uniform", "variational", "argmax"),  # variational / argmax: Flow++'s conditional flow (paper settings)
}


def _permutation(kind: str, channels: int):
    return {
        "conv1x1": lambda: InvertibleConv1x1(channels),
        "conv1x1_lu": lambda: InvertibleConv1x1LU(channels),
        "reverse": lambda: ChannelPermutation.reverse(channels),
        "shuffle": lambda: ChannelPermutation.shuffle(channels),
    }[kind]()


def _flow_step(cfg: dict, channels: int):
    half = channels // 2
    hidden, edge = cfg["hidden_channels"], cfg["edge_padding"]
    if cfg["coupling"] == "affine":
        coupling = AffineCoupling(GlowCouplingNet(half, 2 * (channels - half), hidden, edge), half)
    else:
        coupling = AdditiveCoupling(GlowCouplingNet(half, channels - half, hidden, edge), half)
    return [ActNorm(channels), _permutation(cfg["permutation"], channels), coupling]


def multiscale(cfg: dict, shape: tuple[int, int, int]):
    """Glow's levels on inputs of ``shape``: (list of transforms, base distribution)."""
    _, h, w = shape
    if h % 2 ** cfg["levels"] or w % 2 ** cfg["levels"]:
        raise ValueError(f"image size {h}x{w} is not divisible by 2^levels = {2 ** cfg['levels']}")
    transforms = []
    for level in range(cfg["levels"]):
        transforms.append(Squeeze())
        shape = transforms[-1].output_shape(shape)
        for _ in range(cfg["depth"]):
            transforms += _flow_step(cfg, shape[0])
        if level < cfg["levels"] - 1:
            keep = shape[0] // 2
            transforms.append(Split(ZeroConv2d(keep, 2 * (shape[0] - keep), 3, cfg["edge_padding"]), keep))
            shape = transforms[-1].output_shape(shape)
    if cfg["learn_top"]:
        base = LearnedGaussian(shape, ZeroConv2d(2 * shape[0], 2 * shape[0], 3, cfg["edge_padding"]))
    else:
        base = StandardNormal(shape)
    return transforms, base


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int) -> Flow:
    deq = build_dequantization(cfg["dequantization"], data_shape, num_bits)
    # argmax gives reals centred on 0 with C * code dims channels; dequantized images are centred by -0.5
    transforms = [deq] if cfg["dequantization"] == "argmax" else [deq, ScaleShift(1.0, -0.5)]
    levels, base = multiscale(cfg, deq.output_shape(data_shape))
    return Flow(transforms + levels, base, data_shape)
