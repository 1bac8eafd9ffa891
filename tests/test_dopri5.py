"""Tests of our Dormand-Prince solver and its adjoint (models/transforms/continuous/dopri5.py):
torchdiffeq's step control (the same evaluations of f and the same values and gradients as
torchdiffeq's dopri5, forward, backward and in reverse time), accuracy on linear ODEs with a
closed-form solution, gradients in both end times, and clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.nets.ode_nets import ODENet
from models.transforms.continuous import dopri5
from models.transforms.continuous.cnf import CNF, SolverSettings, _error_norm
from models.transforms.continuous.trace import sample_noise


class Linear(nn.Module):
    """dy/dt = -k y + t: y(t) = (y0 - t0/k + 1/k^2) e^{-k (t - t0)} + t/k - 1/k^2 (k per element)."""

    def __init__(self, k):
        super().__init__()
        self.k = nn.Parameter(k)
        self.nfe = 0

    def forward(self, t, states):
        self.nfe += 1
        return (-self.k * states[0] + t,)

    def exact(self, y0, t0, t1):
        k = self.k
        return (y0 - t0 / k + 1 / k ** 2) * torch.exp(-k * (t1 - t0)) + t1 / k - 1 / k ** 2


def small_cnf():
    torch.manual_seed(0)
    net = ODENet(3, [8, 8], conv=True, layer_type="concat", nonlinearity="softplus")
    return CNF(net, end_time=0.9, train_solver=SolverSettings("dopri5", 1e-5, 1e-5)).train()


def solve_cnf(cnf, x, noise, solver: str, adjoint: bool):
    """(z, dlogp) of one CNF solve and every gradient of a loss on it, with the NFE of both solves."""
    from torchdiffeq import odeint as td_odeint, odeint_adjoint as td_adjoint
    cnf.zero_grad()
    func = cnf.dynamics.solve("hutchinson", noise)
    x = x.clone().requires_grad_(True)
    states, t = (x, torch.zeros(x.shape[0])), cnf._times(x, reverse=False)
    if solver == "ours" and adjoint:
        out = dopri5.odeint_adjoint(func, states, t[0], t[1], rtol=1e-5, atol=1e-5, norm=_error_norm,
                                    params=tuple(func.parameters()))
    elif solver == "ours":
        out = dopri5.odeint(func, states, t[0], t[1], rtol=1e-5, atol=1e-5, norm=_error_norm)
    else:
        out = (td_adjoint if adjoint else td_odeint)(func, states, t, rtol=1e-5, atol=1e-5, method="dopri5",
                                                     options={"norm": _error_norm})
        out = tuple(o[-1] for o in out)
    func.finish_forward()
    (out[0].pow(2).sum() + out[1].sum()).backward()
    grads = {name: p.grad.clone() for name, p in cnf.named_parameters()} | {"x": x.grad.clone()}
    return [o.detach() for o in out], grads, dict(func.nfe)


@pytest.mark.parametrize("adjoint", [True, False])
def test_the_same_evaluations_values_and_gradients_as_torchdiffeq(float64, adjoint):
    cnf, x = small_cnf(), torch.randn(4, 3, 8, 8)
    noise = sample_noise("rademacher", x)
    ours, ours_grads, ours_nfe = solve_cnf(cnf, x, noise, "ours", adjoint)
    ref, ref_grads, ref_nfe = solve_cnf(cnf, x, noise, "torchdiffeq", adjoint)
    assert ours_nfe == ref_nfe and ours_nfe["forward"] > 8  # several steps, and a backward solve for the adjoint
    assert (ours_nfe["backward"] > 0) == adjoint
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert set(ours_grads) == set(ref_grads) and "sqrt_end_time" in ours_grads
    for name in ref_grads:
        torch.testing.assert_close(ours_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_reverse_time_takes_torchdiffeqs_steps(float64):
    from torchdiffeq import odeint as td_odeint
    cnf, z = small_cnf().eval(), torch.randn(4, 3, 8, 8)
    t = cnf._times(z, reverse=True)
    with torch.no_grad():
        func = cnf.dynamics.solve()
        ours = dopri5.odeint(func, (z,), t[0], t[1], rtol=1e-5, atol=1e-5, norm=_error_norm)[0]
        ref_func = cnf.dynamics.solve()
        ref = td_odeint(ref_func, (z,), t, rtol=1e-5, atol=1e-5, method="dopri5", options={"norm": _error_norm})[0][-1]
    assert func.nfe == ref_func.nfe and func.nfe["forward"] > 8
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t0, t1", [(0.0, 2.0), (1.5, -0.5)])
def test_a_linear_ode_is_solved_to_its_tolerance(float64, t0, t1):
    f = Linear(torch.tensor([0.5, 2.0, 8.0]))
    y0 = torch.tensor([1.0, -2.0, 3.0])
    for tol in (1e-4, 1e-8):
        y1 = dopri5.odeint(f, (y0,), torch.tensor(t0), torch.tensor(t1), rtol=tol, atol=tol,
                           norm=lambda s: s[0].pow(2).mean().sqrt())[0]
        exact = f.exact(y0, t0, t1).detach()
        error = float(((y1.detach() - exact).abs() / (tol + tol * exact.abs())).max())  # in units of the tolerance
        assert 0 < error < 20, (tol, error)


@pytest.mark.parametrize("adjoint", [True, False])
def test_gradients_in_the_initial_state_the_parameters_and_both_end_times(float64, adjoint):
    f = Linear(torch.tensor([0.5, 2.0, 8.0]))
    y0 = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    t0, t1 = torch.tensor(0.25, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    weights = torch.tensor([1.0, -3.0, 2.0])
    opts = {"rtol": 1e-10, "atol": 1e-10, "norm": lambda s: s[0].pow(2).mean().sqrt()}
    if adjoint:
        y1 = dopri5.odeint_adjoint(f, (y0,), t0, t1, params=(f.k,), **opts)[0]
    else:
        y1 = dopri5.odeint(f, (y0,), t0, t1, **opts)[0]
    got = torch.autograd.grad((weights * y1).sum(), (y0, f.k, t0, t1))
    expected = torch.autograd.grad((weights * f.exact(y0, t0, t1)).sum(), (y0, f.k, t0, t1))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_a_non_finite_vector_field_and_equal_times_raise_clear_errors():
    def nan_after_half(t, states):
        return (states[0] * (float("nan") if float(t) > 0.5 else -1.0),)

    opts = {"rtol": 1e-5, "atol": 1e-5, "norm": lambda s: s[0].pow(2).mean().sqrt()}
    with pytest.raises(FloatingPointError, match="not finite"):
        dopri5.odeint(nan_after_half, (torch.ones(3),), torch.tensor(0.0), torch.tensor(1.0), **opts)
    with pytest.raises(ValueError, match="two different finite times"):
        dopri5.odeint(nan_after_half, (torch.ones(3),), torch.tensor(1.0), torch.tensor(1.0), **opts)
