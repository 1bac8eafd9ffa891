"""The mod-K location-scale bijection of Discrete Flows (Tran et al. 2019, arXiv:1905.10347 §2.1):

    z = (mu + sigma * x) mod K,        x = sigma^-1 * (z - mu) mod K,        ldj = 0

for categories x, mu in {0..K-1} and sigma a *unit* mod K (gcd(sigma, K) = 1, so sigma has an
inverse mod K and x -> sigma x is a permutation; for K = 2 the only unit is 1: only the shift
acts; for K = 4 the units are {1, 3}).  A bijection of a finite set has no volume change: the
log-det is 0 and log p(x) = log p_base(f(x)) exactly.

On one-hot vectors (classes on the last dimension) both steps are permutations of the vector,
written as bilinear forms so that gradients reach the one-hots of mu and sigma (the
straight-through one-hots of ``straight_through``; the paper's ``one_hot_add`` /
``one_hot_multiply``):

    (sigma * x)_k = sum_u sigma_u x_[(u^-1 k) mod K]        u over the units (``units(K)``)
    (mu + y)_k    = sum_m mu_m y_[(k - m) mod K]

With exact one-hot inputs every sum has one term 1 * 1 and the others 0 * 1, so the output is
an exact one-hot.  Cost: O(K^2) per element for the shift (meant for small K: 2, 4, 8; K = 256
works on small tensors).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def units(k: int) -> list[int]:
    """The units mod k: {s in 1..k-1 : gcd(s, k) = 1} ([1] for k = 2; [1] also for k = 1)."""
    if k < 1:
        raise ValueError(f"need K >= 1 classes, got {k}")
    return [s for s in range(1, max(k, 2)) if math.gcd(s, k) == 1]


def modular_inverse(s: int, k: int) -> int:
    """s^-1 mod k for a unit s."""
    return pow(s, -1, k)


def multiply_index(k: int) -> torch.Tensor:
    """(U, K) long table: row u, column k holds (units[u]^-1 * k) mod K."""
    return torch.tensor([[modular_inverse(s, k) * j % k for j in range(k)] for s in units(k)], dtype=torch.long)


def shift_index(k: int) -> torch.Tensor:
    """(K, K) long table: row m, column j holds (j - m) mod K."""
    return (torch.arange(k)[None, :] - torch.arange(k)[:, None]) % k


def one_hot_multiply(x: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(sigma * x) mod K on one-hots: x (..., K), sigma (..., U) over ``units(K)``,
    ``index`` = ``multiply_index(K)``."""
    return (sigma.unsqueeze(-1) * x[..., index]).sum(dim=-2)


def one_hot_shift(y: torch.Tensor, mu: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(mu + y) mod K on one-hots: y, mu (..., K), ``index`` = ``shift_index(K)``."""
    return (mu.unsqueeze(-1) * y[..., index]).sum(dim=-2)


def modular_affine_indices(x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """(mu + scale * x) mod K on integer (long) tensors."""
    return (mu + scale * x) % k


def modular_affine_inverse_indices(z: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """scale^-1 (z - mu) mod K on integer tensors; ``scale`` holds units."""
    table = torch.zeros(max(k, 2), dtype=torch.long, device=z.device)
    for s in units(k):
        table[s] = modular_inverse(s, k)
    return (table[scale] * (z - mu)) % k


def to_one_hot(index: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(index, k).to(dtype)
