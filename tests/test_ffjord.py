"""Tests of FFJORD / RNODE (models/transforms/continuous, models/nets/ode_nets.py,
models/architectures/ffjord.py): the CNF's log-density against a brute-force integration
of the instantaneous change of variables, unbiased Hutchinson traces, reconstruction,
adjoint against direct gradients, RNODE's auxiliary losses, NFE counting, solver settings
per mode, sampling, the paper configs' structure and a short training run.  (Gradients of
every parameter with and without RNODE, the model's encode/decode, sampling and the paper
configs' parameter counts: tests/test_contract.py.)"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from engine.config import load_config
from models.architectures import build_model, ffjord
from models.nets.ode_nets import ODENet
from models.transforms.continuous.cnf import CNF, SolverSettings
from models.transforms.continuous.trace import exact_trace, hutchinson_trace, sample_noise
from tests.helpers import ROOT, SUBSET, assert_invertible, count_second_order_passes, read_metric, run_command

TIGHT = SolverSettings("dopri5", atol=1e-10, rtol=1e-10)


def cnf_2d(layer_type="concat", end_time=0.8, **kw):
    net = ODENet(2, [16, 16], conv=False, layer_type=layer_type, nonlinearity="tanh")
    with torch.no_grad():  # stronger than the default init: a clearly non-trivial flow
        for p in net.parameters():
            p.mul_(2.5)
    kw = {"train_solver": TIGHT, "test_solver": TIGHT, "trace": "exact", "trace_eval": "exact", **kw}
    return CNF(net, end_time=end_time, **kw)


def tiny_ffjord(shape=(3, 8, 8), **overrides):
    cfg = {"name": "ffjord", **ffjord.DEFAULTS, "levels": 2, "steps": 1, "hidden_channels": [4],
           "solver": "dopri5", "atol": 1e-3, "rtol": 1e-3, **overrides}
    return build_model(cfg, shape, 8).to(torch.get_default_dtype())


def cnfs_of(model):
    return [t for t in model.transforms if isinstance(t, CNF)]


def images(n, shape=(3, 8, 8)):
    return torch.randint(0, 256, (n, *shape)).to(torch.get_default_dtype())


def rk4_brute_force(net, x, end_time, noise=None, n_steps=200):
    """Integrate [z, log-det, kinetic, Jacobian] by hand with classical RK4 on a fine grid;
    the Jacobian of f comes from torch.func (exact), the trace from it (or e^T J e with
    ``noise``)."""
    def jac_at(t, z):
        return torch.func.vmap(torch.func.jacrev(lambda v: net(t, v[None])[0]))(z)

    def rates(t, z):
        with torch.no_grad():
            f = net(t, z)
        jac = jac_at(t, z).detach()
        trace = (torch.einsum("bi,bij,bj->b", noise, jac, noise) if noise is not None
                 else jac.diagonal(dim1=1, dim2=2).sum(1))
        return [f, trace, 0.5 * f.pow(2).mean(1), jac.pow(2).sum((1, 2)) / z.shape[1]]

    h = end_time / n_steps
    z, acc = x.clone(), [torch.zeros(x.shape[0], dtype=x.dtype) for _ in range(3)]
    for k in range(n_steps):
        t = torch.tensor(k * h, dtype=x.dtype)
        k1 = rates(t, z)
        k2 = rates(t + h / 2, z + h / 2 * k1[0])
        k3 = rates(t + h / 2, z + h / 2 * k2[0])
        k4 = rates(t + h, z + h * k3[0])
        incr = [h / 6 * (a + 2 * b + 2 * c + d) for a, b, c, d in zip(k1, k2, k3, k4)]
        z = z + incr[0]
        acc = [a + i for a, i in zip(acc, incr[1:])]
    return z, acc


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
def test_exact_trace_log_density_matches_brute_force_integration(float64, layer_type):
    """2-D data, exact trace: z(T), the CNF's ldj, log p(x) and both RNODE integrals equal a
    hand-rolled fine RK4 integration of the instantaneous change of variables."""
    cnf = cnf_2d(layer_type).train()
    x = torch.randn(6, 2) * 1.5
    cnf.coefficients = {"kinetic_energy": 1.0, "jacobian_norm2": 1.0}  # integrate both regulariser states
    z, ldj, integrals = cnf.integrate(x)
    z_ref, (ldj_ref, ke_ref, jf_ref) = rk4_brute_force(cnf.dynamics.net, x, 0.8)
    assert float(ldj.detach().abs().max()) > 0.1  # a non-trivial volume change
    torch.testing.assert_close(z.detach(), z_ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(ldj.detach(), ldj_ref, atol=1e-7, rtol=0)
    log_px = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) + ldj
    log_px_ref = -0.5 * z_ref.pow(2).sum(1) - math.log(2 * math.pi) + ldj_ref
    torch.testing.assert_close(log_px.detach(), log_px_ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(integrals["kinetic_energy"].detach(), ke_ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(integrals["jacobian_norm2"].detach(), jf_ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_noise_is_drawn_once_and_held_during_the_solve(float64, noise):
    """With Hutchinson's trace the ldj is int e^T J e dt for ONE noise vector per example:
    the brute-force integral with that same (stored) noise reproduces it."""
    cnf = cnf_2d(trace="hutchinson", trace_eval="hutchinson", noise=noise).eval()
    x = torch.randn(5, 2)
    torch.manual_seed(3)
    with torch.no_grad():
        _, ldj = cnf(x)
    torch.manual_seed(3)
    e = sample_noise(noise, x)  # the one draw of that solve (each solve draws its own, in its closure)
    _, (ldj_ref, _, _) = rk4_brute_force(cnf.dynamics.net, x, 0.8, noise=e)
    torch.testing.assert_close(ldj, ldj_ref, atol=1e-7, rtol=0)
    _, (ldj_exact, _, _) = rk4_brute_force(cnf.dynamics.net, x, 0.8)
    assert float((ldj - ldj_exact).abs().max()) > 1e-4  # a real estimate, not the exact trace


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_estimates_are_unbiased(float64, noise):
    """Mean of e^T J e (and of mean((e^T J)^2)) over many noise draws -> tr J (||J||_F^2 / D)."""
    net = ODENet(4, [16], conv=False, nonlinearity="softplus")
    n = 40000
    z = torch.randn(1, 4).expand(n, 4).clone().requires_grad_(True)
    t = torch.tensor(0.3)
    e = sample_noise(noise, z)
    est_tr, est_jf = hutchinson_trace(net(t, z), z, e, create_graph=False)
    z0 = z[:1].detach().clone().requires_grad_(True)
    tr, jf = exact_trace(net(t, z0), z0, create_graph=False)
    for est, exact in ((est_tr, tr[0]), (est_jf, jf[0])):
        assert float(est.std()) > 1e-3  # a noisy estimator ...
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - float(exact)) < 5 * se, (float(est.mean()), float(exact), se)  # ... unbiased


def test_cnf_ldj_with_hutchinson_is_unbiased_for_the_exact_ldj(float64):
    """One 2-D point repeated: the mean Hutchinson ldj over solves equals the exact-trace ldj."""
    cnf = cnf_2d(trace="hutchinson", trace_eval="hutchinson", noise="gaussian",
                 test_solver=SolverSettings("dopri5", 1e-7, 1e-7)).eval()
    n = 4000
    x = torch.randn(1, 2).expand(n, 2).clone()
    with torch.no_grad():
        _, ldj = cnf(x)
        cnf.trace_eval = "exact"
        _, ldj_exact = cnf(x[:1])
    se = float(ldj.std()) / math.sqrt(n)
    assert float(ldj.std()) > 1e-3
    assert abs(float(ldj.mean() - ldj_exact[0])) < 5 * se


def test_forward_then_reverse_integration_reconstructs(float64):
    cnf_2d_ = cnf_2d().eval()
    assert_invertible(cnf_2d_, torch.randn(8, 2) * 2, atol=1e-7)
    net = ODENet(3, [8, 8], conv=True, layer_type="concatsquash")
    conv = CNF(net, end_time=0.7, train_solver=TIGHT, test_solver=TIGHT).eval()
    assert_invertible(conv, torch.randn(4, 3, 4, 4), atol=1e-7)


def _grads(adjoint: bool, x: torch.Tensor):
    torch.manual_seed(1)
    net = ODENet(3, [8], conv=True, layer_type="concatsquash", nonlinearity="softplus")
    settings = SolverSettings("dopri5", 1e-10, 1e-10)
    cnf = CNF(net, end_time=0.9, train_end_time=True, train_solver=settings, trace="hutchinson",
              noise="gaussian", adjoint=adjoint, kinetic_energy=1.0, jacobian_norm2=1.0).train()
    torch.manual_seed(2)  # the same noise in both runs
    z, ldj, integrals = cnf.integrate(x)
    loss = (z.pow(2).sum() - ldj.sum() + sum(r.sum() for r in integrals.values()))
    loss.backward()
    return {name: p.grad.clone() for name, p in cnf.named_parameters()}, cnf.nfe()


def test_adjoint_gradients_match_direct_backpropagation(float64):
    x = torch.randn(3, 3, 4, 4)
    direct, nfe_direct = _grads(False, x)
    adjoint, nfe_adjoint = _grads(True, x)
    assert "sqrt_end_time" in adjoint  # the learnable end time gets its gradient from the adjoint too
    for name in direct:
        torch.testing.assert_close(adjoint[name], direct[name], rtol=1e-5, atol=1e-7, msg=name)
    assert nfe_direct["backward"] == 0 and nfe_adjoint["backward"] > 0


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
def test_rnode_returns_both_regularisers_of_every_block_with_the_forward(layer_type):
    model = tiny_ffjord(layer_type=layer_type, train_end_time=True, kinetic_energy=0.01, jacobian_norm2=0.01).train()
    _, aux = model(images(4), return_aux=True)
    assert {k.rsplit(".", 1)[1] for k in aux} == {"kinetic_energy", "jacobian_norm2"}
    assert len(aux) == 2 * len(cnfs_of(model)) and all(float(v.detach()) > 0 for v in aux.values())


def test_direct_backprop_from_a_zero_initialised_last_layer_has_finite_gradients():
    """Zero last layer: f is constant and dlogp stays 0; the adaptive solver's step-size
    control must not be differentiated (d sqrt(0) = inf)."""
    model = tiny_ffjord(zero_last=True, adjoint=False).train()
    (-model(images(4)).mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_auxiliary_losses_are_coefficient_times_block_means_returned_with_the_forward():
    model = tiny_ffjord(kinetic_energy=0.5, jacobian_norm2=0.0, zero_last=False).train()
    x = images(4)
    torch.manual_seed(7)
    _, aux = model(x, return_aux=True)
    assert set(aux) == {f"transforms.{i}.kinetic_energy" for i, t in enumerate(model.transforms) if isinstance(t, CNF)}
    torch.manual_seed(7)  # the same solves by hand, block by block
    z, expected = x, {}
    for i, t in enumerate(model.transforms):
        if isinstance(t, CNF):
            z, _, integrals = t.integrate(z)
            expected[f"transforms.{i}.kinetic_energy"] = 0.5 * float(integrals["kinetic_energy"].detach().mean())
        else:
            z, _ = t(z)
    assert {k: float(v.detach()) for k, v in aux.items()} == pytest.approx(expected)
    plain = tiny_ffjord().train()
    _, aux = plain(images(2), return_aux=True)
    assert aux == {}  # FFJORD: no regulariser states are even integrated
    assert cnfs_of(plain)[0].integrate(torch.randn(2, 3, 8, 8))[2] == {}


def test_a_cnf_inside_another_family_keeps_its_auxiliary_losses():
    """The hooks live on the layer: a CNF placed in a plain Flow of other layers (here after a
    Glow-style ActNorm) still returns its RNODE loss and reports its NFE."""
    from models.core.distributions import StandardNormal
    from models.core.flow import Flow
    from models.transforms.bijections.actnorm import ActNorm
    net = ODENet(3, [4], conv=True)
    cnf = CNF(net, train_solver=SolverSettings("rk4", step_size=0.5), kinetic_energy=0.1)
    model = Flow([ActNorm(3), cnf], StandardNormal((3, 4, 4)), (3, 4, 4)).train()
    x = torch.randn(2, 3, 4, 4)
    model.data_init(x)
    _, aux = model(x, return_aux=True)
    assert set(aux) == {"transforms.1.kinetic_energy"} and float(aux["transforms.1.kinetic_energy"].detach()) > 0
    assert model.diagnostics()["transforms.1.nfe_forward"] == 8
    assert model.likelihood_kind == "estimated"  # Hutchinson in training mode


def test_nfe_is_counted_per_step_and_eval_uses_the_test_solver():
    model = tiny_ffjord(solver="euler", step_size=0.5, test_solver="rk4", test_step_size=0.25, adjoint=True,
                        train_end_time=False)  # (a learnable T costs the adjoint one more evaluation, for dL/dT)
    n_cnf = len(cnfs_of(model))
    assert n_cnf == 3  # 3x8x8, squeeze, 12x4x4, factor out half, 6x4x4
    model.train()
    loss = -model(images(2)).mean()
    assert model.diagnostics_summary()["nfe_forward/sum"] == 2 * n_cnf  # euler, 2 steps
    loss.backward()
    diag = model.diagnostics_summary()
    assert diag["nfe_forward/sum"] == 2 * n_cnf and diag["nfe_backward/sum"] == 2 * n_cnf
    model.eval()
    with torch.no_grad():
        model(images(2))
    diag = model.diagnostics_summary()  # every solve counts its own evaluations
    assert diag["nfe_forward/sum"] == 16 * n_cnf and diag["nfe_backward/sum"] == 0  # rk4: 4 steps x 4


def test_sampling_by_reverse_integration():
    model = tiny_ffjord(test_solver="rk4", test_step_size=0.5).eval()
    x = model.sample(3, temperature=0.7)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()
    assert float(x.min()) >= 0 and float(x.max()) <= 255 and torch.equal(x, x.round())
    assert all(c.nfe()["inverse"] == 8 for c in cnfs_of(model))


def test_paper_configs_structure():
    """ODENVP 4 scales x (2 + 2) CNFs - 2 = 14 blocks of 3x3 concat convs 64-64-64: 1,358,868
    weights, plus one learnable end time per block in FFJORD (RNODE fixes T; the counts of
    both configs: tests/test_contract.py)."""
    for config, learnable_t in (("ffjord_cifar10.yaml", True), ("rnode_cifar10.yaml", False)):
        cfg = load_config(f"{ROOT}/experiments/{config}", [])
        with torch.device("meta"):
            model = build_model(cfg["model"], (3, 32, 32), 8, cfg["dequantizer"])
        assert len(cnfs_of(model)) == 14
        assert all(("sqrt_end_time" in dict(c.named_parameters())) == learnable_t for c in cnfs_of(model))
    assert cfg["model"]["kinetic_energy"] == cfg["model"]["jacobian_norm2"] == 0.01
    assert cfg["model"]["logit_alpha"] == 0.05 and not cfg["model"]["train_end_time"]


def test_a_few_training_steps_lower_bpd_on_the_subset(tmp_path):
    """A tiny RNODE-regularised CNF (fixed-step rk4) trained 15 steps through train.py."""
    out = tmp_path / "run"
    args = [sys.executable, "train.py", "experiments/ffjord_small.yaml", "--out", str(out), f"data.path={SUBSET}",
            "model.levels=1", "model.steps=1", "model.hidden_channels=[8]", "model.solver=rk4", "model.step_size=0.5",
            "model.test_solver=rk4", "model.test_step_size=0.5", "model.kinetic_energy=0.01",
            "model.jacobian_norm2=0.01", "train.steps=15", "train.batch_size=8", "train.lr=0.01",
            "train.warmup_steps=0", "train.log_every=5", "train.eval_every=15", "train.checkpoint_every=0",
            "train.sample_every=0", "eval.batch_size=32", "eval.max_examples=32"]
    run_command(args)
    test_bpd = read_metric(out, "test/bpd")
    assert set(test_bpd) == {0, 15}
    assert test_bpd[15] < test_bpd[0] - 0.2, test_bpd
    nfe = read_metric(out, "diag/nfe_forward/sum")
    assert nfe and all(v == 8 for v in nfe.values())  # rk4 at step 0.5 on [0, 1], one block
    for name in ("kinetic_energy", "jacobian_norm2"):  # the trainer logs the weighted regularisers
        logged = read_metric(out, f"train/aux/{name}")
        assert set(logged) == {5, 10, 15} and all(0 < v < 1e3 for v in logged.values()), (name, logged)


@pytest.mark.parametrize("conv,layout", [(True, torch.contiguous_format), (True, torch.channels_last),
                                         (False, torch.contiguous_format)])
def test_concat_layer_equals_the_layer_on_the_concatenation(float64, conv, layout):
    """ConcatLayer computes W_x x + b + t (W_t 1) without building [t, x]: the same values, and the
    same gradients for x, t and the weights, borders included (zero padding: fewer taps there), in
    either memory layout; its second derivatives (the adjoint differentiates f's vector-Jacobian
    product) pass gradgradcheck."""
    from models.nets.ode_nets import ConcatLayer
    torch.manual_seed(0)
    layer = ConcatLayer(5, 7, conv)
    x = (torch.randn(3, 5, 6, 4).contiguous(memory_format=layout) if conv else torch.randn(3, 5)).requires_grad_()
    t = torch.tensor(0.37, requires_grad=True)
    y = layer(t, x)
    ref = layer.layer(torch.cat([torch.ones_like(x[:, :1]) * t, x], dim=1))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, t, layer.layer.weight, layer.layer.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, t, layer.layer.weight, layer.layer.bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def f(x, t, weight, bias):
        return torch.func.functional_call(layer, {"layer.weight": weight, "layer.bias": bias}, (t, x))

    inputs = (x, t, layer.layer.weight.detach().requires_grad_(), layer.layer.bias.detach().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs) and torch.autograd.gradgradcheck(f, inputs)


def test_the_ode_net_runs_in_float32_under_bf16_autocast():
    """Every evaluation of f runs with autocast off: under bf16 the solver takes the steps it takes in float32."""
    torch.manual_seed(0)
    model = tiny_ffjord().eval()
    x = torch.randint(0, 256, (2, 3, 8, 8)).float()
    with torch.no_grad():
        torch.manual_seed(1)
        full = model.log_prob(x)
        nfe = [dict(m.nfe()) for m in model.modules() if isinstance(m, CNF)]
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.log_prob(x)
        assert [dict(m.nfe()) for m in model.modules() if isinstance(m, CNF)] == nfe
    torch.testing.assert_close(half, full, rtol=0, atol=1e-4)


def test_only_a_solve_imports_torchdiffeq():
    """torchdiffeq imports scipy (~40 MB resident): config checks, the trainer and the other families must not pay it."""
    code = ("import sys; import engine.config, engine.trainer, engine.run, models.architectures.ffjord; "
            "assert 'torchdiffeq' not in sys.modules and 'scipy' not in sys.modules, sorted(sys.modules)")
    run_command([sys.executable, "-c", code])


def test_the_adjoint_forward_solve_computes_no_weight_gradients(monkeypatch):
    """The adjoint's forward solve (and eval) differentiates f only w.r.t. z for the trace: the
    convolutions' weight gradients are never computed there, only in the backward solve."""
    from models.nets import conv2d as module

    masks = []
    original = module._grads
    monkeypatch.setattr(module, "_grads", lambda go, x, w, p, mask: masks.append(tuple(mask)) or original(go, x, w, p, mask))
    torch.manual_seed(0)
    model = tiny_ffjord(hidden_channels=[4, 4]).train()
    x = images(2)
    with torch.no_grad():
        model.log_prob(x)
    assert masks and all(mask == (True, False) for mask in masks)
    masks.clear()
    model.log_prob(x).sum().backward()  # the backward solve: both gradients
    assert (False, True) in masks or (True, True) in masks
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_softplus_derivatives_of_every_order_match_torchs_softplus(float64):
    """Including the region above torch's threshold (u > 20: softplus(u) = u, softplus'(u) = 1)."""
    from models.nets.softplus import softplus

    u = torch.cat([torch.randn(12) * 4, torch.tensor([19.5, 20.5, 25.0, -30.0])]).reshape(4, 4).requires_grad_()
    assert torch.autograd.gradcheck(softplus, (u,)) and torch.autograd.gradgradcheck(softplus, (u,))
    w, w2, w3 = torch.randn_like(u), torch.randn_like(u), torch.randn_like(u)
    results = []
    for f in (softplus, torch.nn.functional.softplus):
        y = f(u)
        (d1,) = torch.autograd.grad((y * w).sum(), u, create_graph=True)
        (d2,) = torch.autograd.grad((d1 * w2).sum(), u, create_graph=True)  # the adjoint's order
        (d3,) = torch.autograd.grad((d2 * w3).sum(), u)  # a graph built through the second order
        results.append((y, d1, d2, d3))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_softplus_second_derivative_makes_fewer_passes_than_torchs():
    from models.nets.softplus import softplus

    u = torch.randn(4, 6)
    counts = [count_second_order_passes(f, u) for f in (softplus, torch.nn.functional.softplus)]
    assert counts[0] <= 4 < 9 <= counts[1], counts
