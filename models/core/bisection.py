"""Vectorised bisection for monotone equations: the inverse of layers with no closed form
(the logistic-mixture CDF of Flow++, planar and Sylvester flows).

Solves g(x) = y elementwise for increasing g on a bracket [lo, hi] with g(lo) <= y <= g(hi).
It halves every bracket until it cannot shrink any more in floating point (lo and hi are
adjacent numbers) or ``max_iters`` is reached, so the answer is as exact as the dtype allows.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def bisect(g, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, max_iters: int = 200):
    """Returns ``(x, iterations)`` with g(x) = y to the precision of ``y``'s dtype."""
    iters = 0
    for iters in range(1, max_iters + 1):
        mid = lo + (hi - lo) / 2
        active = (mid != lo) & (mid != hi)
        if not bool(active.any()):
            break
        above = g(mid) > y
        hi = torch.where(above & active, mid, hi)
        lo = torch.where(~above & active, mid, lo)
    return lo + (hi - lo) / 2, iters
