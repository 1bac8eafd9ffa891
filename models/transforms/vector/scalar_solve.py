"""Bisection for monotone scalar equations, vectorised over a batch.

Solves g(a) = y for increasing g on a bracket [lo, hi] with g(lo) <= y <= g(hi).  Used
by the iterative inverses of planar and Sylvester flows, whose equations reduce to
``a + c * tanh(r * a + k) = y`` with ``1 + c * r * tanh' > 0`` (the invertibility
constraint), so ``a`` lies in [y - |c|, y + |c|].
"""
from __future__ import annotations

import torch


def bisect(g, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, iters: int = 60) -> torch.Tensor:
    lo, hi = lo.clone(), hi.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = g(mid) < y
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def solve_tanh_equation(y, c, r, k, iters: int = 60):
    """The a with a + c * tanh(r * a + k) = y (elementwise, broadcasting)."""
    bound = c.abs() + 1e-12
    g = lambda a: a + c * torch.tanh(r * a + k)  # noqa: E731
    return bisect(g, y, y - bound, y + bound, iters)
