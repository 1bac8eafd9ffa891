"""Tests of models/nets/ode_net_closed_form.py: f, its Hutchinson trace and their vector-Jacobian
product written out equal autograd's (float64, both layouts, the softplus threshold), which nets it
covers, and that an FFJORD training step through it equals the step through autograd."""
from __future__ import annotations

import pytest
import torch

from models.nets import ode_net_closed_form as closed_form
from models.nets.ode_nets import ODENet
from models.transforms.continuous.dynamics import AugmentedDynamics
from models.transforms.continuous.trace import hutchinson_trace


def _net(channels=3, hidden=(5, 6, 4), scale=1.0):
    torch.manual_seed(0)
    net = ODENet(channels, hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _autograd(net, t, z, e, c_f, c_tr):
    t = t.detach().requires_grad_(True)
    z = z.detach().requires_grad_(True)
    f = net(t, z)
    tr, _ = hutchinson_trace(f, z, e, create_graph=True)
    phi = (c_f * f).sum() + (c_tr * tr).sum()
    params = list(net.parameters())
    grads = torch.autograd.grad(phi, [z, t, *params])
    return f.detach(), tr.detach(), grads[0], grads[1], dict(zip(params, grads[2:]))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: pre-activations beyond softplus's threshold of 20
def test_the_written_out_product_is_autograds(layout, scale, float64):
    net = _net(scale=scale)
    z = torch.randn(3, 3, 5, 4).contiguous(memory_format=layout)
    e = torch.randint(0, 2, z.shape).to(z.dtype).mul(2).sub(1).contiguous(memory_format=layout)
    c_f, c_tr, t = torch.randn_like(z), torch.randn(3), torch.tensor(0.37)
    f, tr, d_z, d_t, grads = closed_form.hutchinson_vjp(net, t, z, e, c_f, c_tr)
    f_a, tr_a, d_z_a, d_t_a, grads_a = _autograd(net, t, z, e, c_f, c_tr)
    assert torch.allclose(f, f_a, atol=1e-12) and torch.allclose(tr, tr_a, atol=1e-12)
    assert torch.allclose(d_z, d_z_a, atol=1e-10) and torch.allclose(d_t, d_t_a, atol=1e-10)
    assert set(grads) == set(grads_a)
    for p, g in grads_a.items():
        assert grads[p].shape == p.shape and torch.allclose(grads[p], g, atol=1e-10, rtol=1e-9)
    f2, tr2 = closed_form.hutchinson(net, t, z, e)
    assert torch.equal(f2, f) and torch.equal(tr2, tr)
    if scale > 1:  # the threshold really was crossed
        u = net.layers[0](t, z)
        assert (u > 20).any()


def test_it_covers_ffjords_nets_and_no_other():
    assert closed_form.supports(ODENet(3, (8, 8)))
    assert not closed_form.supports(ODENet(3, (8, 8), nonlinearity="tanh"))
    assert not closed_form.supports(ODENet(3, (8, 8), layer_type="concatsquash"))
    assert not closed_form.supports(ODENet(2, (8, 8), conv=False))


def test_the_dynamics_take_it_only_for_the_hutchinson_trace_without_regularisers(float64):
    dyn = AugmentedDynamics(_net())
    z = torch.randn(2, 3, 4, 4)
    e = torch.randn_like(z).sign()
    zeros, t = torch.zeros(2), torch.tensor(0.5)
    cot = (torch.randn_like(z), torch.randn(2))
    assert dyn.rates_vjp(t, (z, zeros), cot, tuple(dyn.net.parameters()), "hutchinson", e) is not None
    assert dyn.rates_vjp(t, (z, zeros), cot, tuple(dyn.net.parameters()), "exact", None) is None
    assert dyn.rates_vjp(t, (z, zeros, zeros, zeros), cot, tuple(dyn.net.parameters()), "hutchinson", e) is None
    assert dyn.rates_vjp(t, (z, zeros), cot, (torch.nn.Parameter(torch.zeros(1)),), "hutchinson", e) is None  # not the net's
    # its rates are the autograd rates
    with torch.no_grad():
        by_hand = dyn.rates(t, (z, zeros), "hutchinson", e)
    dyn.by_hand = False
    with torch.no_grad():
        plain = dyn.rates(t, (z, zeros), "hutchinson", e)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(by_hand, plain))


def test_a_cnf_training_step_is_the_same_either_way(float64):
    """Forward solve, adjoint backward solve, every gradient: the written-out product against autograd's."""
    from models.transforms.continuous.cnf import CNF
    results = []
    for by_hand in (True, False):
        torch.manual_seed(0)
        cnf = CNF(ODENet(3, (6, 6)), end_time=0.5)
        cnf.dynamics.by_hand = by_hand
        x = torch.randn(2, 3, 4, 4)
        torch.manual_seed(1)
        z, ldj = cnf(x)
        loss = (z ** 2).sum() - ldj.sum()
        grads = torch.autograd.grad(loss, list(cnf.parameters()))
        results.append((z.detach(), ldj.detach(), grads, dict(cnf.nfe())))
    (z1, l1, g1, n1), (z2, l2, g2, n2) = results
    assert torch.allclose(z1, z2, atol=1e-10) and torch.allclose(l1, l2, atol=1e-10)
    assert n1 == n2  # the same evaluations of f in both solves
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-7)
