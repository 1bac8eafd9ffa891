"""Closed-form derivatives: an elementwise activation differentiated twice, and the higher orders
of any closed-form derivative by autograd over its formula.

``twice_differentiable(value, first, first_formula, second)`` builds f(u) = ``value(u)`` whose
first derivative with a graph (``create_graph``: FFJORD's adjoint, Residual Flows' Neumann
gradient) is differentiated in closed form:

    backward of f:                  grad -> grad f'(u)                 ``first(grad, u)``, fused
    backward of grad f'(u):         d/d grad = gg f'(u)                ``first(gg, u)``
                                    d/du     = gg grad f''(u)          ``second(gg, grad, u)``

``differentiate`` gives every higher order: when a graph is built through the second order (a
third derivative), the backward recomputes the first derivative from its formula
(``first_formula``: differentiable operations) and differentiates that,

    d<g, formula(a_1, ..., a_n)>/da_i    for the a_i that require grad,

so every order matches the plain operation's.  ``silu.py``, ``softplus.py`` and ``conv2d.py``
use it.  Under autocast f is plain ``value`` (autocast's dtype rules; the callers here run
with autocast off).  ``will_use(ctx)``: the gradients a custom Function's backward must compute.
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def differentiate(formula: Callable[..., Tensor], inputs: tuple, grad: Tensor) -> tuple:
    """The gradients of <grad, formula(*inputs)> for the inputs that require grad (None for the
    others), with a graph (create_graph)."""
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return (None,) * len(inputs)
    with torch.enable_grad():
        found = iter(torch.autograd.grad(formula(*inputs), wanted, grad, create_graph=True))
    return tuple(next(found) if t.requires_grad else None for t in inputs)


def twice_differentiable(value: Callable[[Tensor], Tensor], first: Callable[[Tensor, Tensor], Tensor],
                         first_formula: Callable[[Tensor, Tensor], Tensor], second: Callable[..., Tensor],
                         derivative: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """f(u) = value(u) with the closed-form first and second derivatives of the module docstring.
    Both autograd Functions keep what autograd keeps for f: u, and for the second order grad and u.

    ``derivative(u)``: f'(u) as a tensor, for an f whose f'' is cheaper from f'(u) than from u
    (softplus: f'' = f' (1 - f')).  A first derivative with a graph then computes it once and keeps
    it (one more tensor of u's size): grad f'(u) and d/d grad = gg f'(u) are products, and
    ``second(gg, grad, u, f'(u))`` gets it."""

    class FirstDerivative(torch.autograd.Function):
        """(grad, u) -> grad f'(u)."""

        @staticmethod
        def forward(ctx, grad, u):
            if derivative is None:
                ctx.save_for_backward(grad, u)
                return first(grad, u)
            slope = derivative(u)
            ctx.save_for_backward(grad, u, slope)
            return grad * slope

        @staticmethod
        def backward(ctx, gg):
            grad, u, *slope = ctx.saved_tensors
            if torch.is_grad_enabled():  # a third order: differentiate the formula with autograd
                return differentiate(first_formula, (grad, u), gg)
            need_grad, need_u = ctx.needs_input_grad[:2]
            if derivative is None:
                return first(gg, u) if need_grad else None, second(gg, grad, u) if need_u else None
            return gg * slope[0] if need_grad else None, second(gg, grad, u, slope[0]) if need_u else None

    class Value(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return value(u)

        @staticmethod
        def backward(ctx, grad):
            (u,) = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph: a first derivative that can be differentiated
                return FirstDerivative.apply(grad, u)
            return first(grad, u)

    def f(u: Tensor) -> Tensor:
        if torch.is_autocast_enabled(u.device.type):
            return value(u)
        return Value.apply(u)

    return f


def will_use(ctx) -> list[bool]:
    """Per input: does this backward pass need its gradient (it requires grad *and* the engine
    will run the node it flows into), for a custom Function's backward; ``ctx.needs_input_grad``
    only says the first.  A leaf's node cannot be asked inside ``torch.autograd.grad`` (torch
    raises): a leaf counts as needed there.  ``conv2d.py`` asks in every backward: the power
    series' vector-Jacobian products (``autograd.grad(g, x, w)`` without create_graph) would
    otherwise compute every weight gradient too (a Residual Flow forward at batch 8: 12.2 s
    without asking, 8.6 s with; the question costs a few microseconds).  While Dynamo traces the
    backward (``train.compile``) there is no graph to ask (torch 2.11's Dynamo raises on
    ``ctx.next_functions``): every input that requires grad counts as needed (more work, the same values)."""
    if torch.compiler.is_compiling():
        return [bool(need) for need in ctx.needs_input_grad]
    used = [bool(need) and node is not None and _will_run(node)
            for need, (node, _) in zip(ctx.needs_input_grad, ctx.next_functions)]
    return used + [False] * (len(ctx.needs_input_grad) - len(used))  # no edge for a trailing None (bias)


def _will_run(node) -> bool:
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # a leaf (AccumulateGrad) during torch.autograd.grad
        return True
