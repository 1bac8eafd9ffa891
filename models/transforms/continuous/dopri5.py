"""Dormand-Prince 5(4) with adaptive steps, on a tuple of tensors (the CNF's (z, dlogp, ...)):

    k_i = f(t + c_i h, y + h sum_j a_ij k_j),   y' = y + h sum_i b_i k_i,   err = h sum_i e_i k_i

(Dormand & Prince 1980; Hairer, Norsett & Wanner, *Solving ODEs I*, Sec. II.4-5; e = b - b*, the
5th- minus the embedded 4th-order weights; the last stage is f at the new point, reused as the
next step's first).  The step control is torchdiffeq's ``dopri5`` (the solver of the FFJORD
reference, arXiv:1810.01367), so a solve takes the same evaluations of f as the reference's:

- first step (Hairer Sec. II.4): s = atol + rtol |y0|, d0 = ||y0 / s||, d1 = ||f0 / s||,
  h0 = 0.01 d0 / d1 (1e-6 if d0 or d1 < 1e-5), d2 = ||(f(t0 + h0, y0 + h0 f0) - f0) / s|| / h0,
  h = min(100 h0, (0.01 / max(d1, d2))^(1/5))  (max(1e-6, 1e-3 h0) if d1, d2 <= 1e-15);
- a step is accepted when r = ||err / (atol + rtol max(|y|, |y'|))|| <= 1, and the next step is
  h min(10, max(0.9 r^(-1/5), 1 if accepted else 0.2))  (10 h if r = 0);
- steps are not shortened to end at t1: the state at t1 is the 4th-order dense output of the
  step that reaches it (Shampine 1986: a quartic through y, y', the midpoint and both slopes).

``norm`` maps a tuple of tensors (the scaled errors, one per state) to a scalar tensor; the solve
reads it and the step sizes on the host (an adaptive solver decides each step there).  Times are
Python floats inside the solve; f gets them as 0-d tensors of the states' dtype.

``odeint_adjoint`` gives O(1)-memory gradients (Chen et al. 2018, arXiv:1806.07366, Sec. 2 and
App. B): the forward solve keeps no graph; the backward integrates from t1 to t0

    d/dt [y, a, g_theta, g_t] = [f, -a^T df/dy, -a^T df/dtheta, -a^T df/dt],   a(t1) = dL/dy(t1)

with the same solver and tolerances, and an error norm over all of it (torchdiffeq's default:
the max of |g_t|, the state norm of y and of a, and the RMS of each parameter's adjoint).  A
function may offer ``vjp(t, y, cotangents, params)`` -> (f, d/dt, d/dy, d/dparams), or None: the
backward solve then takes f and its vector-Jacobian product from it instead of from autograd.

Why not torchdiffeq's own loop: it flattens a tuple state into one vector on every evaluation,
keeps the stages in a trailing dimension (strided sums) and casts every time value; with the
same evaluations of f this loop does less of that work around them.
"""
from __future__ import annotations

from typing import Callable

import torch

States = tuple[torch.Tensor, ...]
Norm = Callable[[States], torch.Tensor]

# Butcher tableau (Dormand & Prince 1980): nodes c, stage weights a (the last row is b, FSAL),
# error weights e = b - b*, and the dense-output midpoint weights (Shampine 1986, halved).
C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = ((1 / 5,),
     (3 / 40, 9 / 40),
     (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
     (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
     -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
       187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)
ORDER = 5
SAFETY, MAX_FACTOR, MIN_FACTOR = 0.9, 10.0, 0.2


def _combine(y: States | None, ks: list[States], weights, h: float) -> States:
    """y + h sum_i w_i k_i per state (y None: the sum alone)."""
    out = []
    for j in range(len(ks[0])):
        acc = None if y is None else y[j]
        for w, k in zip(weights, ks):
            if w == 0.0:
                continue
            acc = k[j] * (h * w) if acc is None else torch.add(acc, k[j], alpha=h * w)
        out.append(acc)
    return tuple(out)


def _scaled(err: States, y0: States, y1: States, rtol: float, atol: float) -> States:
    """err / (atol + rtol max(|y0|, |y1|)), per state."""
    return tuple(e / (torch.maximum(a.abs(), b.abs()) * rtol + atol) for e, a, b in zip(err, y0, y1))


def _initial_step(func, time, y0: States, f0: States, rtol: float, atol: float, norm: Norm,
                  direction: float) -> float:
    """|h| of the first step (Hairer, Norsett & Wanner Sec. II.4, as torchdiffeq); one evaluation of f."""
    with torch.no_grad():
        scale = tuple(y.abs() * rtol + atol for y in y0)
        d0 = float(norm(tuple(y / s for y, s in zip(y0, scale))))
        d1 = float(norm(tuple(f / s for f, s in zip(f0, scale))))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        f1 = func(time(direction * h0), _combine(y0, [f0], (1.0,), direction * h0))
        d2 = float(norm(tuple((b - a) / s for a, b, s in zip(f0, f1, scale)))) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / ORDER)
    return min(100 * h0, h1)


def _next_step(h: float, ratio: float) -> float:
    if ratio == 0.0:
        return h * MAX_FACTOR
    floor = 1.0 if ratio < 1.0 else MIN_FACTOR
    return h * min(MAX_FACTOR, max(SAFETY / ratio ** (1.0 / ORDER), floor))


def _dense_output(y0: States, y1: States, ks: list[States], h: float, x) -> States:
    """The quartic p(x), x in [0, 1], through y0, y1, the midpoint y0 + h sum MID_i k_i and the slopes
    k_0, k_6, written as one combination of y0, y1 and the stages (``x`` a float, or a 0-d tensor
    when the end time is differentiated)."""
    x2, x3, x4 = x * x, x * x * x, x * x * x * x
    c_y0 = 1 - 11 * x2 + 18 * x3 - 8 * x4
    c_y1 = -5 * x2 + 14 * x3 - 8 * x4
    c_mid = 16 * x2 - 32 * x3 + 16 * x4
    c_f0 = x - 4 * x2 + 5 * x3 - 2 * x4
    c_f1 = x2 - 3 * x3 + 2 * x4
    weights = [c_mid * m for m in MID]
    weights[0], weights[-1] = weights[0] + c_f0, weights[-1] + c_f1
    if not isinstance(x, torch.Tensor):
        return _combine(None, [y0, y1, *ks], [c_y0 + c_mid, c_y1, *(h * w for w in weights)], 1.0)
    out = []
    for j in range(len(y0)):
        acc = y0[j] * (c_y0 + c_mid).to(y0[j].dtype) + y1[j] * c_y1.to(y0[j].dtype)
        for w, k in zip(weights, ks):
            acc = acc + k[j] * (h * w).to(k[j].dtype)
        out.append(acc)
    return tuple(out)


def odeint(func: Callable[[torch.Tensor, States], States], y0: States, t0: torch.Tensor, t1: torch.Tensor, *,
           rtol: float, atol: float, norm: Norm) -> States:
    """y(t1) of dy/dt = func(t, y), y(t0) = y0 (t1 < t0 integrates backwards).

    Differentiable by autograd (backpropagation through the solver): through every stage, in t0
    (every stage time moves with it) and in t1 (through the dense output); the step sizes are not
    differentiated."""
    start, end = float(t0.detach()), float(t1.detach())
    if not (start != end and abs(end - start) < float("inf")):
        raise ValueError(f"an ODE solve needs two different finite times, got {start} and {end}")
    dtype = y0[0].dtype
    base = t0.to(dtype) if torch.is_grad_enabled() and t0.requires_grad else t0.detach().to(dtype)
    direction, total = (1.0 if end > start else -1.0), end - start

    def time(offset: float) -> torch.Tensor:
        return base + offset

    f0 = func(time(0.0), y0)
    h = direction * _initial_step(func, time, y0, f0, rtol, atol, norm, direction)
    t, y, f, last = 0.0, y0, f0, None
    while direction * (total - t) > 0:
        if t + h == t:
            raise FloatingPointError(f"ODE solve: the step size underflowed ({h:.3g}) at t = {start + t:.6g}")
        ks = [f]
        for c, a in zip(C, A):
            stage = _combine(y, ks, a, h)
            ks.append(func(time(t + c * h), stage))
        with torch.no_grad():
            ratio = float(norm(_scaled(_combine(None, ks, E, h), y, stage, rtol, atol)))
        if ratio != ratio or ratio == float("inf"):
            raise FloatingPointError(f"ODE solve: the error estimate is not finite at t = {start + t:.6g} "
                                     "(a non-finite state or vector field)")
        if ratio <= 1.0:
            last = (t, h, y, stage, ks)
            t, y, f = t + h, stage, ks[-1]
        h = _next_step(h, ratio)
    step_start, step, y_a, y_b, ks = last
    x = (total - step_start) / step
    if torch.is_grad_enabled() and (t0.requires_grad or t1.requires_grad):
        # the same value; d x / d t1 = 1 / h and d x / d t0 = -1 / h (the end moves along the dense output)
        x = x + ((t1 - t0).to(torch.float64) - total) / step
    return _dense_output(y_a, y_b, ks, step, x)


class _Adjoint(torch.autograd.Function):
    """y(t1) of the forward solve without a graph; gradients by the adjoint backward solve."""

    @staticmethod
    def forward(ctx, func, options, n_states, t0, t1, *tensors):
        y0, params = tensors[:n_states], tensors[n_states:]
        with torch.no_grad():
            y1 = odeint(func, y0, t0, t1, **options)
        ctx.func, ctx.options, ctx.n_states = func, options, n_states
        ctx.save_for_backward(t0, t1, *y1, *params)
        return y1

    @staticmethod
    def backward(ctx, *grad_y1):
        t0, t1, *saved = ctx.saved_tensors
        n, func, options = ctx.n_states, ctx.func, ctx.options
        y1, params = tuple(saved[:n]), tuple(saved[n:])
        grad_y1 = tuple(torch.zeros_like(y) if g is None else g for y, g in zip(y1, grad_y1))
        t_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dtype = y1[0].dtype
        sizes = [p.numel() for p in params]

        by_hand = getattr(func, "vjp", None)  # f's product written out, where func offers it (else None)

        def dynamics(t: torch.Tensor, aug: States) -> States:
            y, adj = aug[1:1 + n], aug[1 + n:1 + 2 * n]
            out = None if by_hand is None else by_hand(t, y, tuple(-a for a in adj), params)
            if out is not None:
                f, vjp_t, vjp_y, vjp_p = out
                vjp_t = vjp_t if t_grad else t.new_zeros(())
            else:
                with torch.enable_grad():
                    t_ = t.detach().requires_grad_(t_grad)
                    y_ = tuple(v.detach().requires_grad_(True) for v in y)
                    f = func(t_, y_)
                    inputs = ((t_,) if t_grad else ()) + y_ + params
                    grads = torch.autograd.grad(f, inputs, tuple(-a for a in adj), allow_unused=True)
                vjp_t = grads[0] if t_grad and grads[0] is not None else t.new_zeros(())
                grads = grads[1:] if t_grad else grads
                vjp_y = tuple(torch.zeros_like(v) if g is None else g for v, g in zip(y_, grads[:n]))
                vjp_p = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[n:])]
            flat = torch.cat([g.reshape(-1) for g in vjp_p]) if params else aug[-1]
            return (vjp_t.reshape(()).to(dtype), *(v.detach() for v in f), *vjp_y, flat)

        state_norm = options["norm"]

        def adjoint_norm(scaled: States) -> torch.Tensor:
            parts = [scaled[0].abs(), state_norm(scaled[1:1 + n]), state_norm(scaled[1 + n:1 + 2 * n])]
            if params:
                parts += [p.pow(2).mean().sqrt() for p in scaled[-1].split(sizes)]
            return torch.stack(parts).max()

        with torch.no_grad():
            vjp_t = torch.zeros((), dtype=dtype, device=y1[0].device)
            grad_t1 = None
            if t_grad:  # dL/dt1 = <f(t1, y(t1)), dL/dy(t1)>: one more evaluation of f
                f1 = func(t1.detach().to(dtype), y1)
                grad_t1 = sum((f * g).sum() for f, g in zip(f1, grad_y1))
                vjp_t = vjp_t - grad_t1
            zeros = y1[0].new_zeros(sum(sizes))  # the parameters' adjoint, flat (empty without parameters)
            aug0 = (vjp_t, *y1, *grad_y1, zeros)
            aug = odeint(dynamics, aug0, t1.detach(), t0.detach(), rtol=options["rtol"], atol=options["atol"],
                         norm=adjoint_norm)
        adj_y0 = aug[1 + n:1 + 2 * n]
        adj_params = [g.view_as(p) for g, p in zip(aug[-1].split(sizes), params)] if params else []
        grad_t0 = aug[0].to(t0.dtype) if t_grad else None
        grad_t1 = grad_t1.to(t1.dtype) if t_grad else None
        return (None, None, None, grad_t0, grad_t1, *adj_y0, *adj_params)


def odeint_adjoint(func, y0: States, t0: torch.Tensor, t1: torch.Tensor, *, rtol: float, atol: float,
                   norm: Norm, params: tuple[torch.Tensor, ...]) -> States:
    """``odeint`` whose gradients (w.r.t. y0, ``params``, t0 and t1) come from the adjoint backward solve."""
    options = {"rtol": rtol, "atol": atol, "norm": norm}
    return _Adjoint.apply(func, options, len(y0), t0, t1, *y0, *params)
