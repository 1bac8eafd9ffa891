"""Flow++ (Ho et al. 2019, arXiv:1902.00275): variational dequantization, logistic-mixture CDF
couplings, gated convolution + self-attention conditioners (official ``flows/run_cifar.py``).

    x (integers) -> dequantizer (``dequantizer.kind``: variational, the paper's: a conditional
                    flow q(u|x); uniform; or argmax)
    -> logit pre-processing (y * 0.9 + 0.05, logit: the official ImgProc; not after argmax)
    -> checkerboard split, steps[0] x [Norm, Pointwise, coupling, swap halves], merge
    -> squeeze
    -> channel split,      steps[1] x [same]
    -> checkerboard split, steps[2] x [same], merge
    -> N(0, I)

Norm is a per-element ActNorm (one scale and bias per element of each half, as the
official ``Norm``), Pointwise one invertible 1x1 conv per half (noisy-identity init); see
``models.builders.flowpp_steps``.  A split stacks its two halves along channels
(``checkerboard.py``), so the coupling conditions on the first half and transforms the
second, and swapping halves is the official ``TupleFlip``.  The variational dequantizer
(``models.builders.dequantizer``) is a checkerboard flow of ``dequantizer.steps`` such steps
(``dequantizer.hidden_blocks`` blocks, conditioned on a context net) followed by a sigmoid;
the paper's shares the main flow's heads, logistics, attention and dropout (0.2 here by
default).  Squeeze uses the official (TensorFlow space_to_depth) channel order, so the
channel split halves are the top and bottom rows of each 2x2 block.

experiments/flowpp_cifar10.yaml: 31,443,440 parameters, as the official code.
"""
from __future__ import annotations

from common.ranges import at_least, between, each
from models.builders.dequantizer import build_dequantizer
from models.builders.flowpp_steps import flow_steps
from models.builders.stack import LayerStack
from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.transforms.bijections.checkerboard import CheckerboardMerge, CheckerboardSplit
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.squeeze import Squeeze

DEFAULTS = {
    "steps": [4, 2, 3],        # checkerboard steps, (squeeze) channel steps, checkerboard steps
    "hidden_channels": 96,     # width of the coupling networks (the official "filters")
    "hidden_blocks": 10,       # gated conv + attention blocks per coupling network
    "heads": 4,
    "components": 32,          # logistics per mixture; 0 = affine coupling (ablation)
    "attention": True,         # False: pointwise gated NIN instead (ablation)
    "dropout": 0.2,
    "logit_alpha": 0.05,       # pre-processing y * (1 - 2 alpha) + alpha, then logit
}

RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "steps": each(at_least(0), length=3), "hidden_channels": at_least(1), "hidden_blocks": at_least(1),
    "heads": at_least(1), "components": at_least(0), "dropout": between(0, 1, hi_open=True),
    "logit_alpha": between(0, 0.5, hi_open=True),
}

CHOICES: dict = {}

DEQUANTIZERS = ("variational", "uniform", "argmax")
DEQUANTIZER_DEFAULTS = {"dropout": 0.2}  # the paper's dequantizer uses the model's dropout


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    _, h, w = data_shape
    if h % 4 or w % 4:
        raise ValueError(f"image size {h}x{w} must be divisible by 4 (checkerboard split after a squeeze)")
    if len(cfg["steps"]) != 3:
        raise ValueError("model.steps needs 3 numbers: checkerboard, channel and checkerboard steps")
    n1, n2, n3 = cfg["steps"]
    stack = LayerStack(data_shape).add(build_dequantizer(dequantizer, data_shape, num_bits))
    # argmax already gives unbounded reals (C * code dims channels): no logit pre-processing
    if dequantizer["kind"] != "argmax":
        stack.add(Logit(cfg["logit_alpha"]))
    stack.add(CheckerboardSplit())
    stack.add(*flow_steps(n1, stack.shape, cfg), CheckerboardMerge())
    stack.add(Squeeze(order="tf"))
    stack.add(*flow_steps(n2, stack.shape, cfg))
    stack.add(CheckerboardSplit())
    stack.add(*flow_steps(n3, stack.shape, cfg), CheckerboardMerge())
    return Flow(stack.transforms, StandardNormal(stack.shape), data_shape)
