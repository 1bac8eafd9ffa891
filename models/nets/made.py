"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015).

Every unit gets a degree.  Inputs carry their position in the autoregressive ordering
``m(d) in {1..D}``; hidden units get degrees in ``{min m, ..., D - 1}``; connections are
kept where

    hidden <- previous:  m_k >= m_prev            output <- hidden:  m(d) > m_k

so output ``d`` depends only on inputs that come strictly before ``d`` in the ordering:
the Jacobian d out_d / d x is strictly triangular after sorting by the ordering.
``ordering`` is "natural" (1..D), "reverse", "random" (a seeded shuffle) or an explicit
permutation.  The network returns ``params`` outputs per input, shape
(B, params, D) (e.g. shift and log-scale for MAF/IAF).  An optional ``context`` (B, C)
enters the first hidden layer through an unmasked linear map (used by IAF in a VAE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


def make_ordering(dim: int, ordering="natural", seed: int = 0) -> torch.Tensor:
    """Degrees 1..D of the inputs, as a permutation of 1..D."""
    if isinstance(ordering, torch.Tensor):
        order = ordering.long()
        if sorted(order.tolist()) != list(range(1, dim + 1)):
            raise ValueError("an explicit ordering must be a permutation of 1..D")
        return order
    # (on the CPU explicitly: the masks are built from these even when the model is built on the meta device)
    if ordering == "natural":
        return torch.arange(1, dim + 1, device="cpu")
    if ordering == "reverse":
        return torch.arange(dim, 0, -1, device="cpu")
    if ordering == "random":
        return torch.randperm(dim, generator=torch.Generator().manual_seed(seed), device="cpu") + 1
    raise ValueError(f"unknown ordering {ordering!r}")


class MADE(nn.Module):
    def __init__(self, dim: int, hidden: list[int] | tuple[int, ...] = (64, 64), params: int = 2,
                 ordering="natural", seed: int = 0, context_features: int | None = None):
        super().__init__()
        self.dim, self.params = dim, params
        order = make_ordering(dim, ordering, seed).cpu()
        self.register_buffer("degrees", order.clone())
        degrees = [order]
        low = int(order.min())
        for h in hidden:
            if dim > 1:
                deg = torch.arange(h, device="cpu") % max(1, dim - 1) + low
                deg = deg.clamp(max=dim - 1)
            else:
                deg = torch.zeros(h, dtype=torch.long, device="cpu")  # no input can feed any output
            degrees.append(deg)
        layers = []
        for prev, cur in zip(degrees[:-1], degrees[1:]):
            layers.append(MaskedLinear(len(prev), len(cur), (cur[:, None] >= prev[None, :])))
        out_mask = (order[:, None] > degrees[-1][None, :]).repeat(params, 1)  # (params*D, H)
        self.hidden_layers = nn.ModuleList(layers)
        self.out = MaskedLinear(len(degrees[-1]), params * dim, out_mask)
        with torch.no_grad():  # small outputs: each autoregressive layer starts near the identity
            self.out.weight.mul_(0.01)
            self.out.bias.zero_()
        self.context = nn.Linear(context_features, hidden[0]) if context_features else None

    def forward(self, x, context=None):
        h = x
        for i, layer in enumerate(self.hidden_layers):
            h = layer(h)
            if i == 0 and self.context is not None and context is not None:
                h = h + self.context(context)
            h = F.relu(h)
        return self.out(h).reshape(x.shape[0], self.params, self.dim)
