"""Discrete (mod-K) coupling of Discrete Flows (Tran et al. 2019, arXiv:1905.10347 §2.2,
"discrete bipartite flows"), on one-hot categories x of shape (B, C, H, W, K):

    kept:         x_m                                     (mask m = 1: checkerboard or channel half)
    conditioner:  theta = NN(m * x)   -> logits of mu (K per element) and of sigma (one per unit)
    mu  = one-hot argmax of its logits, sigma likewise over ``units(K)``, both straight-through
          (forward exact one-hots, backward softmax(theta / tau); ``straight_through``)
    transformed:  z_(1-m) = (mu + sigma * x_(1-m)) mod K  (``modular_affine``)
    inverse:      x_(1-m) = sigma^-1 (z_(1-m) - mu) mod K (the same mu, sigma: NN sees m * z = m * x)
    ldj = 0       (a bijection of a finite set)

The network sees the one-hots of the kept elements, the transformed ones zeroed, as
C * K channels, and emits C * (K + U) logit channels (U = number of units; 0 when the scale is
off or K = 2, where 1 is the only unit and only the shift acts).  A zero-initialised last layer
gives mu = 0, sigma = 1 (the first maximal logit): the layer starts as the identity.

``normalize`` (ours, not the paper's): each element's logit vector is standardised over its
classes, theta = (a - mean a) / sqrt(var a + 1), before the straight-through step.  The argmax
(the forward) is unchanged; the backward softmax(theta / tau) can then never saturate.  Without
it the logits grow under Adam until softmax(theta / tau) is one-hot for every element, the
gradient of the minority elements vanishes and mu, sigma freeze at what the majority wants (on
``tests/test_discrete_flows.py``'s correlated toy the raw version never leaves the identity).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, zeros_ldj
from models.transforms.discrete.modular_affine import (modular_affine_inverse_indices, multiply_index, one_hot_multiply,
                                                       one_hot_shift, shift_index, to_one_hot, units)
from models.transforms.discrete.straight_through import straight_through_one_hot


def logit_channels(num_classes: int, scale: bool = True) -> int:
    """Logits per element the conditioner emits: K for mu, plus one per unit for sigma."""
    n_units = len(units(num_classes))
    return num_classes + (n_units if scale and n_units > 1 else 0)


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """(a - mean a) / sqrt(var a + 1) over the last dimension: the argmax is unchanged, small
    logits pass nearly as they are (a zero-initialised net stays smooth), large ones are scaled
    to unit variance (|theta| <= sqrt(K - 1))."""
    centred = logits - logits.mean(dim=-1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=-1, keepdim=True) + 1.0).sqrt()


class ModularCoupling(Transform):
    discrete = True

    def __init__(self, net: nn.Module, mask: torch.Tensor, num_classes: int, tau: float = 1.0, scale: bool = True,
                 normalize: bool = True):
        """``mask``: (C, H, W), 1 on the kept elements; ``net``: (B, C*K, H, W) -> (B, C * logit_channels, H, W)."""
        super().__init__()
        self.net, self.num_classes, self.tau, self.normalize = net, num_classes, tau, normalize
        self.scale = scale and len(units(num_classes)) > 1
        self.register_buffer("mask", mask.bool(), persistent=False)
        self.register_buffer("units", torch.tensor(units(num_classes), dtype=torch.long), persistent=False)
        self.register_buffer("mul_index", multiply_index(num_classes), persistent=False)
        self.register_buffer("add_index", shift_index(num_classes), persistent=False)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mu logits (B, C, H, W, K), sigma logits (B, C, H, W, U) or None) from the kept part of x."""
        b, c, h, w, k = x.shape
        kept = (x * self.mask.unsqueeze(-1).to(x.dtype)).movedim(-1, 2).reshape(b, c * k, h, w)
        out = self.net(kept).to(x.dtype).reshape(b, c, -1, h, w).movedim(2, -1)
        mu, sigma = out[..., :k], (out[..., k:] if self.scale else None)
        if self.normalize:
            mu, sigma = standardize(mu), (None if sigma is None else standardize(sigma))
        return mu, sigma

    def forward(self, x, context=None):
        mu_logits, sigma_logits = self.logits(x)
        y = x
        if sigma_logits is not None:
            y = one_hot_multiply(y, straight_through_one_hot(sigma_logits, self.tau), self.mul_index)
        z = one_hot_shift(y, straight_through_one_hot(mu_logits, self.tau), self.add_index)
        return torch.where(self.mask.unsqueeze(-1), x, z), zeros_ldj(x)

    def inverse(self, z, context=None, *, temperature=1.0):
        mu_logits, sigma_logits = self.logits(z)
        mu = mu_logits.argmax(dim=-1)
        scale = self.units[sigma_logits.argmax(dim=-1)] if sigma_logits is not None else torch.ones_like(mu)
        x = to_one_hot(modular_affine_inverse_indices(z.argmax(dim=-1), mu, scale, self.num_classes),
                       self.num_classes, z.dtype)
        return torch.where(self.mask.unsqueeze(-1), z, x)
