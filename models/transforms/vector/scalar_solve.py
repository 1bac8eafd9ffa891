"""The scalar equation behind the iterative inverses of planar and Sylvester flows.

Both reduce to ``a + c * tanh(r * a + k) = y`` with ``1 + c * r * tanh' > 0`` (the
invertibility constraint), so the left side increases in ``a`` and ``a`` lies in
[y - |c|, y + |c|]: solved by bisection (``models.core.bisection``).
"""
from __future__ import annotations

import torch

from models.core.bisection import bisect


def solve_tanh_equation(y, c, r, k, max_iters: int = 200):
    """The a with a + c * tanh(r * a + k) = y (elementwise, broadcasting)."""
    y, c, r, k = torch.broadcast_tensors(y, c, r, k)
    bound = c.abs() + 1e-12
    a, _ = bisect(lambda a: a + c * torch.tanh(r * a + k), y, y - bound, y + bound, max_iters)
    return a
