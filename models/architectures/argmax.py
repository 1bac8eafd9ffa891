"""Argmax flows for categorical images (Hoogeboom et al. 2021; SurVAE Flows, Nielsen et al. 2020).

Every sub-pixel is a category in {0, ..., K-1}, K = 2^data.n_bits (256 for CIFAR-10; 2 for
Fashion-MNIST at n_bits=1, i.e. binarized at 128; 4 or 8 colour levels at n_bits=2 or 3):

    x (categories) -> argmax surjection: z ~ q(z | x) with decode(z) = x, ldj = -log q(z | x)
                      (encoding binary: ceil(log2 K) dims per sub-pixel, signs = bits;
                       onehot: K dims, argmax = x; noise from Flow++'s conditional
                       checkerboard mixture-logistic flow, ``noise_*`` settings)
    -> Glow's levels (squeeze, depth x [ActNorm, 1x1 conv, coupling], split) -> learned top prior

log_prob is the variational bound E_q[log p(z) - log q(z | x)] <= log P(x) in nats of the
discrete data; bits/dim divide by C*H*W of the data (not of the encoding).
"""
from __future__ import annotations

from models.architectures import glow
from models.architectures.flowpp import build_dequantization
from models.core.flow import Flow
from models.transforms.surjections.argmax import ENCODINGS

DEFAULTS = {
    "encoding": "binary",      # binary | onehot
    # the backbone: Glow's levels (see glow.py)
    "levels": 3,
    "depth": 8,
    "hidden_channels": 256,
    "coupling": "affine",
    "permutation": "conv1x1",
    "learn_top": True,
    "edge_padding": True,
    # q(v | x): Flow++'s conditional flow (checkerboard logistic-mixture couplings + context net)
    "noise_steps": 2,
    "noise_filters": 64,
    "noise_blocks": 1,
    "noise_components": 8,
    "noise_heads": 4,
    "noise_attention": True,
    "context_channels": 32,
    "context_blocks": 2,
    "dropout": 0.0,
}

CHOICES = {
    "encoding": tuple(ENCODINGS),
    "coupling": glow.CHOICES["coupling"],
    "permutation": glow.CHOICES["permutation"],
}


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int) -> Flow:
    surjection = build_dequantization(
        "argmax", data_shape, num_bits, encoding=cfg["encoding"], steps=cfg["noise_steps"],
        filters=cfg["noise_filters"], blocks=cfg["noise_blocks"], heads=cfg["noise_heads"],
        components=cfg["noise_components"], attention=cfg["noise_attention"], dropout=cfg["dropout"],
        context_channels=cfg["context_channels"], context_blocks=cfg["context_blocks"])
    levels, base = glow.multiscale(cfg, surjection.output_shape(data_shape))
    return Flow([surjection, *levels], base, data_shape)
