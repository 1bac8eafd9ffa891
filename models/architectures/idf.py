"""Integer Discrete Flows (Hoogeboom et al. 2019, arXiv:1905.07376): a multi-scale flow on the
integer lattice.

    x in {0..2^n - 1} -> x - 2^(n-1)                         (integers, no dequantization:
                                                              ``dequantizer.kind`` is ``none``)
    for level in 1..L:  squeeze -> K x [channel shuffle -> integer additive coupling]
                        -> factor out half the channels with a conditional prior (not at level L)
    top prior: discretized logistic mixture with learned per-element parameters

Every layer maps integers to integers exactly, so

    log P(x) = sum_levels log P(y_l | z_l) + log P(z_top)

is the exact discrete log-probability (bits/dim = -log2 P(x) / D) and a code length
(``compression.codec``).  Coupling and split-prior networks are IDF's DenseNets
(``hidden_blocks`` dense layers whose growths sum to ``hidden_channels``; L = ``levels``,
K = ``steps``).  With L=3, K=8, DenseNets of depth 12 growing by 512 channels, quarter splits, one-component
split priors and a 5-component top prior this is the official CIFAR-10 model
(``main_experiment.py --n_flows 8 --n_levels 3 --n_channels 512 --coupling_type densenet
--densenet_depth 12 --n_mixtures 5 --splitprior_type densenet``): 58,458,052 parameters.
"""
from __future__ import annotations

from common.ranges import at_least
from models.builders.stack import LayerStack
from models.core.flow import Flow
from models.nets.densenet import DenseNet
from models.transforms.bijections.permutation import ChannelPermutation
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.discrete.factor_out import IntegerFactorOut, params_per_channel
from models.transforms.discrete.integer_coupling import IntegerAdditiveCoupling, translated_channels
from models.transforms.discrete.integer_shift import IntegerShift
from models.core.distributions import DiscretizedLogisticMixturePrior

DEFAULTS = {
    "levels": 3,                 # L (--n_levels)
    "steps": 8,                  # K couplings per level (--n_flows)
    "hidden_channels": 512,      # total DenseNet growth (--n_channels)
    "hidden_blocks": 12,         # dense layers per network (--densenet_depth)
    "coupling_split": "quarter", # translate 1/4 (--split_quarter) or 1/2 of the channels
    "permutation": "shuffle",    # fixed random channel permutation before each coupling
    "prior_mixtures": 5,         # components of the top prior (--n_mixtures)
    "split_prior_mixtures": 1,   # components of each conditional split prior (official: 1)
}
RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "levels": at_least(1), "steps": at_least(1), "hidden_channels": at_least(1), "hidden_blocks": at_least(1),
    "prior_mixtures": at_least(1), "split_prior_mixtures": at_least(1),
}

CHOICES = {
    "coupling_split": ("quarter", "half"),
    "permutation": ("shuffle", "reverse"),
}

DEQUANTIZERS = ("none",)  # discrete: the flow models the integers themselves


def _permutation(kind: str, channels: int) -> ChannelPermutation:
    return ChannelPermutation.shuffle(channels) if kind == "shuffle" else ChannelPermutation.reverse(channels)


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    """``dequantizer`` is ``{"kind": "none"}``: IDF has no dequantizer."""
    if dequantizer.get("kind", "none") != "none":
        raise ValueError(f"idf takes no dequantizer (discrete data), got dequantizer.kind {dequantizer['kind']!r}")
    _, h, w = data_shape
    if h % 2 ** cfg["levels"] or w % 2 ** cfg["levels"]:
        raise ValueError(f"image size {h}x{w} is not divisible by 2^levels = {2 ** cfg['levels']}")
    for key in ("prior_mixtures", "split_prior_mixtures", "steps", "hidden_blocks", "hidden_channels"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    bins = float(2 ** num_bits)
    hidden, depth = cfg["hidden_channels"], cfg["hidden_blocks"]
    stack = LayerStack(data_shape).add(IntegerShift(2 ** (num_bits - 1)))
    for level in range(cfg["levels"]):
        stack.add(Squeeze())
        channels = stack.shape[0]
        cond = channels - translated_channels(channels, cfg["coupling_split"])
        for _ in range(cfg["steps"]):
            stack.add(_permutation(cfg["permutation"], channels))
            stack.add(IntegerAdditiveCoupling(DenseNet(cond, channels - cond, hidden, depth), cond, bins))
        if level < cfg["levels"] - 1:
            keep, k = channels - channels // 2, cfg["split_prior_mixtures"]
            net = DenseNet(keep, (channels - keep) * params_per_channel(k), hidden, depth)
            stack.add(IntegerFactorOut(net, keep, k, bins))
    prior = DiscretizedLogisticMixturePrior(stack.shape, cfg["prior_mixtures"], bins)
    return Flow(stack.transforms, prior, data_shape)
