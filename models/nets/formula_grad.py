"""The higher orders of a closed-form derivative, by autograd over its formula.

``silu.py`` and ``conv2d.py`` give first and second derivatives in closed form.  When a graph is
built through the second order (a third derivative), their backward recomputes the first
derivative from its formula with differentiable operations and differentiates that:

    d<g, f(a_1, ..., a_n)>/da_i    for the a_i that require grad

so every order matches the plain operation's.
"""
from __future__ import annotations

from typing import Callable

import torch


def differentiate(formula: Callable[..., torch.Tensor], inputs: tuple, grad: torch.Tensor) -> tuple:
    """The gradients of <grad, formula(*inputs)> for the inputs that require grad (None for the
    others), with a graph (create_graph)."""
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return (None,) * len(inputs)
    with torch.enable_grad():
        found = iter(torch.autograd.grad(formula(*inputs), wanted, grad, create_graph=True))
    return tuple(next(found) if t.requires_grad else None for t in inputs)
