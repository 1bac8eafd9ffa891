"""Tests of Residual Flows / i-ResNet (models/architectures/resflow.py, models/transforms/residual,
models/nets/lipschitz.py): Lipschitz constraint, unbiasedness of the roulette log-det,
the memory-efficient backward, the fixed-point inverse and a short training run through
train.py.  (Gradients of every parameter with either backward, sampling, encode/decode and
the paper config's parameter count: tests/test_contract.py.)"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from engine.config import load_config
from models.architectures import build_model, resflow
from models.nets import lipschitz
from models.nets.lipschitz import SpectralNormBase, SpectralNormConv2d, SpectralNormLinear, power_iterate
from models.nets.lipswish import LipSwish
from models.nets.resflow_nets import ConvResidualNet, FCResidualNet
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.residual.iresblock import InvertibleResidualBlock
from models.transforms.residual.logdet_estimators import exact_logdet, roulette_weights, survival
from tests.helpers import (SUBSET, assert_invertible, assert_ldj_matches_jacobian, count_second_order_passes, read_metric,
                           run_command)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3, 4, 4)


def tiny_resflow(**overrides):
    cfg = {"name": "resflow", **resflow.DEFAULTS, "steps": [1, 1], "hidden_channels": 8, "fc_steps": 1,
           "fc_hidden_channels": 8, **overrides}
    return build_model(cfg, SHAPE, 8).to(torch.get_default_dtype())


def images(n):
    return torch.randint(0, 256, (n, *SHAPE)).to(torch.get_default_dtype())


def blocks_of(model):
    return [t for t in model.transforms if isinstance(t, InvertibleResidualBlock)]


def strong_block(shape=(2, 3, 3), hidden=8, fc=False, coeff=0.98, **kw):
    """A block whose layers all sit at the coefficient (weights scaled up, then normalised),
    so Lip(g) is close to coeff^3 and the series has a real tail."""
    net = (FCResidualNet if fc else ConvResidualNet)(shape, hidden, coeff=coeff, atol=1e-6, rtol=1e-6, max_iters=200)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (SpectralNormConv2d, SpectralNormLinear)):
                m.weight.mul_(5.0)
                m.power_iteration()
    return InvertibleResidualBlock(net, **kw)


def linear_regime_block(**kw):
    """An FC block on 2x3x3 inputs whose g is affine near x ~ N(0, 1): ELU layers fed large
    positive pre-activations (derivative 1), so J = 0.9^3 W3 W2 W1 with orthogonal W_l.
    log det(I + J) is then of order one and the power series has a long tail."""
    d = 18
    net = FCResidualNet((2, 3, 3), d, activation="elu", preact=False, coeff=0.9, atol=1e-10, rtol=1e-10,
                        max_iters=1000)
    layers = [m for m in net.modules() if isinstance(m, SpectralNormLinear)]
    with torch.no_grad():
        for m, b in zip(layers, (5.0, 30.0, 0.0)):
            m.weight.copy_(torch.linalg.qr(torch.randn(d, d))[0])
            m.bias.fill_(b)
            m.power_iteration()
    return InvertibleResidualBlock(net, **kw)


def jacobian_spectral_norm(fn, x, iters=50):
    """Largest singular value of the Jacobian of fn at each example of x, shape (B,): power
    iteration on J^T J with autograd (J^T w by a vector-Jacobian product, J v by the
    double-vjp trick), never reading the layers' stored sigma."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    dummy = torch.zeros_like(y, requires_grad=True)
    jt_dummy = torch.autograd.grad(y, x, dummy, create_graph=True)[0]  # J^T dummy, linear in dummy

    def jv(v):
        return torch.autograd.grad(jt_dummy, dummy, v, retain_graph=True)[0]

    def jtw(w):
        return torch.autograd.grad(y, x, w, retain_graph=True)[0]

    def unit(t):
        return t / t.flatten(1).norm(dim=1).reshape(-1, *[1] * (t.dim() - 1))

    v = unit(torch.randn_like(x))
    for _ in range(iters):
        v = unit(jtw(jv(v)))
    return jv(v).flatten(1).norm(dim=1)


# ---- Lipschitz layers ------------------------------------------------------------------------

def test_spectral_norm_matches_svd_for_linear_and_conv(float64):
    lin = SpectralNormLinear(6, 5, coeff=0.5, atol=1e-9, rtol=1e-9, max_iters=5000)
    lin.power_iteration()
    assert lin.sigma().item() == pytest.approx(torch.linalg.matrix_norm(lin.weight, 2).item(), rel=1e-6)
    assert torch.linalg.matrix_norm(lin.normalized_weight(), 2).item() <= 0.5 * (1 + 1e-6)
    conv = SpectralNormConv2d(2, 3, 3, (2, 4, 4), coeff=0.5, atol=1e-9, rtol=1e-9, max_iters=5000)
    conv.power_iteration()
    # the conv operator on 2x4x4 inputs (zero padding) as a 48 x 32 matrix
    eye = torch.eye(32).reshape(32, 2, 4, 4)
    mat = torch.nn.functional.conv2d(eye, conv.weight, padding=1).reshape(32, 48).T
    assert conv.sigma().item() == pytest.approx(torch.linalg.matrix_norm(mat, 2).item(), rel=1e-5)
    # buffers (saved in checkpoints), coefficient a plain float (never a parameter)
    assert {"u", "v"} <= set(dict(conv.named_buffers())) and isinstance(conv.coeff, float)
    assert {n for n, _ in conv.named_parameters()} == {"weight", "bias"}


def test_induced_mixed_norms(float64):
    # ||D||_{p->p} = max |d_i| for a diagonal D, for every p
    lin = SpectralNormLinear(5, 5, coeff=0.5, atol=1e-12, rtol=1e-12, max_iters=5000, domain=3.0, codomain=3.0)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([0.3, -2.0, 1.0, 0.5, 1.5])))
    lin.power_iteration()
    assert lin.sigma().item() == pytest.approx(2.0, rel=1e-6)
    # a general 2->3 norm: the estimate beats random search, and W_hat respects coeff on random inputs
    lin = SpectralNormLinear(6, 4, coeff=0.5, atol=1e-12, rtol=1e-12, max_iters=5000, domain=2.0, codomain=3.0)
    lin.power_iteration()
    x = torch.randn(20000, 6)
    ratios = torch.linalg.vector_norm(x @ lin.weight.T, 3, dim=1) / torch.linalg.vector_norm(x, 2, dim=1)
    assert lin.sigma().item() >= ratios.max().item() * (1 - 1e-9)
    ratios_hat = torch.linalg.vector_norm(x @ lin.normalized_weight().T, 3, dim=1) / x.norm(dim=1)
    assert ratios_hat.max().item() <= 0.5 * (1 + 1e-9)
    # a mixed-norm model builds and trains one step
    model = tiny_resflow(lipschitz_norm="3223")
    model.data_init(images(8))
    (-model.log_prob(images(8)).mean()).backward()
    model.after_optimizer_step()
    with pytest.raises(ValueError, match="lipschitz_norm"):
        tiny_resflow(lipschitz_norm="2333")


def _iterate_alone(layer, max_iters):
    """The stopping rule for one layer on its own: step, count, stop at its test or at max_iters."""
    it = 0
    for it in range(1, max_iters + 1):
        done = layer._step_(layer.weight.detach(), layer.u, layer.v)
        if done is not None and bool(done):
            break
    return it


def test_power_iteration_in_step_matches_each_layer_alone_with_one_read_per_round(float64, monkeypatch):
    def layers():
        torch.manual_seed(0)
        out = [SpectralNormLinear(6, 5, atol=1e-6, rtol=1e-6, max_iters=500, init_iters=0),
               SpectralNormLinear(6, 5, atol=1e-3, rtol=1e-3, max_iters=500, init_iters=0),
               SpectralNormConv2d(2, 3, 3, (2, 4, 4), atol=1e-8, rtol=0, max_iters=500, init_iters=0),
               SpectralNormConv2d(3, 3, 1, (3, 4, 4), atol=1e-5, rtol=1e-5, max_iters=4, init_iters=0),
               SpectralNormLinear(5, 5, atol=0, rtol=0, max_iters=7, init_iters=0),   # a fixed count: no test
               SpectralNormLinear(5, 4, atol=1e-7, rtol=1e-7, max_iters=500, init_iters=0, domain=2.0, codomain=3.0)]
        for m in out:
            with torch.no_grad():
                m.weight.mul_(torch.linspace(0.5, 2.0, m.weight.numel()).reshape(m.weight.shape))
        return out

    alone = layers()
    with torch.no_grad():
        counts = [_iterate_alone(m, m.max_iters) for m in alone]
    assert len(set(counts)) >= 4 and counts[3] == 4 and counts[4] == 7  # stopped by their tests, their max_iters
    together = layers()
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or tolist(t))
    power_iterate(together)
    assert [m.last_iters for m in together] == counts
    for a, b in zip(alone, together):
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    # one read per round while a layer still has a test to make: the rounds of the longest such layer
    tested = [c for m, c in zip(alone, counts) if m.atol > 0 or m.rtol > 0]
    assert len(reads) == max(tested)
    assert reads[0] == 5  # the first round reads the five tested layers' stops at once


def test_the_model_hook_iterates_every_block_in_step(float64, monkeypatch):
    torch.manual_seed(0)
    model = tiny_resflow(steps=[2, 2], fc_steps=2)
    model.data_init(images(8))
    sn = [m for m in model.modules() if isinstance(m, SpectralNormBase)]
    with torch.no_grad():
        for m in sn:
            m.weight.mul_(1.01)
    calls = []
    real = lipschitz._iterate_in_step
    monkeypatch.setattr(lipschitz, "_iterate_in_step", lambda layers, *a: calls.append(len(layers)) or real(layers, *a))
    model.after_optimizer_step()
    assert calls == [len(sn)] and len(sn) == 3 * 6  # one joint iteration over the 6 blocks' 18 layers
    assert all(m.last_iters >= 1 for m in sn)


def test_lipswish_is_1_lipschitz():
    act = LipSwish()
    x = torch.linspace(-10, 10, 20001, requires_grad=True)
    for beta in (-3.0, 0.5, 5.0):
        with torch.no_grad():
            act.beta.fill_(beta)
        (d,) = torch.autograd.grad(act(x).sum(), x)
        assert d.abs().max().item() <= 1.0


def test_lipswish_without_autograd_is_the_same_function():
    act = LipSwish()
    x = torch.linspace(-10, 10, 2001)
    for beta in (-3.0, 0.5, 5.0):
        with torch.no_grad():
            act.beta.fill_(beta)
            fused = act(x.clone())
        with torch.enable_grad():
            plain = act(x)
        torch.testing.assert_close(fused, plain.detach(), rtol=1e-6, atol=1e-7)


def test_lipswish_derivatives_of_every_order_match_the_plain_formula(float64):
    act = LipSwish(beta=0.3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert torch.autograd.gradcheck(act, (x,))
    assert torch.autograd.gradgradcheck(act, (x,))  # the Neumann gradient differentiates the vjp
    plain = x * torch.sigmoid(x * torch.nn.functional.softplus(act.beta)) / 1.1
    w = torch.randn_like(x)
    ours = torch.autograd.grad((act(x) * w).sum(), (x, act.beta), create_graph=True)
    ref = torch.autograd.grad((plain * w).sum(), (x, act.beta), create_graph=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    second = [torch.autograd.grad(g.sum(), (x, act.beta), retain_graph=True) for g in (ours[0], ref[0])]
    for a, b in zip(*second):
        torch.testing.assert_close(a, b)
    for a, b in zip(torch.autograd.grad((act(x) * w).sum(), (x, act.beta)),  # the fused first-order path
                    torch.autograd.grad((plain * w).sum(), (x, act.beta))):
        torch.testing.assert_close(a, b)


def test_lipswish_keeps_one_activation_sized_tensor_for_backward():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    act = LipSwish()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x)
    assert sum(n for n in saved if n == x.numel()) == x.numel()  # x alone (the formula keeps x and sigmoid)


def _folded_and_plain_nets():
    """The residual branches of Residual Flows with random slopes: conv (with and without the
    pre-activation) and fully connected."""
    torch.manual_seed(0)
    nets = [ConvResidualNet((3, 4, 4), 6, preact=True), ConvResidualNet((3, 4, 4), 6, preact=False),
            FCResidualNet((3, 2, 2), 5, preact=True)]
    for net in nets:
        for m in net.modules():
            if isinstance(m, LipSwish):
                with torch.no_grad():
                    m.beta.uniform_(-1.0, 1.5)
    return nets


def test_folded_lipswish_nets_are_the_plain_composition_to_every_derivative_order(float64):
    # the slopes folded into the layers around them (lipswish_chain) against the layers run one by one
    for net in _folded_and_plain_nets():
        assert net.fold_lipswish
        x = torch.randn(2, *((3, 4, 4) if isinstance(net, ConvResidualNet) else (3, 2, 2)), requires_grad=True)
        w = torch.randn_like(x)
        params = [x, *net.parameters()]
        results = []
        for fold in (True, False):
            net.fold_lipswish = fold
            y = net(x)
            first = torch.autograd.grad((y * w).sum(), params, create_graph=True)  # every parameter, every beta
            vjp = first[0]  # a power-series vector-Jacobian product, differentiated again (Neumann)
            second = torch.autograd.grad((vjp * w).sum(), params, allow_unused=True)
            with torch.no_grad():
                sampled = net(x.detach().clone())  # the in-place path of sampling
            results.append([y, *first, *[torch.zeros(()) if s is None else s for s in second], sampled])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
        net.fold_lipswish = True
        assert torch.autograd.gradgradcheck(lambda t: net(t), (x,))


def test_folded_lipswish_nets_make_no_elementwise_pass_for_the_slope():
    # plain LipSwish computes b y (and divides by 1.1) over every hidden activation in the forward
    # and in each backward; folded, those products touch only the weights
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden = 6
    net = ConvResidualNet((3, 4, 4), hidden, preact=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    hidden_numel = 2 * hidden * 4 * 4

    class CountHiddenProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.products = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.div, torch.ops.aten.mul_,
                                       torch.ops.aten.div_) and out.numel() == hidden_numel:
                self.products += 1
            return out

    counts = {}
    for fold in (False, True):
        net.fold_lipswish = fold
        with CountHiddenProducts() as mode:
            y = net(x)
            torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)  # a power-series product
            y.sum().backward()
        counts[fold] = mode.products
    assert counts[False] >= 6 and counts[True] == 0, counts


def test_silu_derivatives_of_every_order_match_autograds_silu(float64):
    from models.nets.silu import silu

    u = torch.randn(3, 5, requires_grad=True)
    assert torch.autograd.gradcheck(silu, (u,)) and torch.autograd.gradgradcheck(silu, (u,))
    w, w2, w3 = torch.randn_like(u), torch.randn_like(u), torch.randn_like(u)
    results = []
    for f in (silu, torch.nn.functional.silu):
        (d1,) = torch.autograd.grad((f(u) * w).sum(), u, create_graph=True)
        (d2,) = torch.autograd.grad((d1 * w2).sum(), u, create_graph=True)  # the Neumann gradient's order
        (d3,) = torch.autograd.grad((d2 * w3).sum(), u)  # a graph built through the second order
        results.append((d1, d2, d3))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_silu_first_and_second_derivatives_make_fewer_passes_than_autograds():
    from models.nets.silu import silu

    u = torch.randn(4, 6)
    counts = [count_second_order_passes(f, u) for f in (silu, torch.nn.functional.silu)]
    assert counts[0] <= 8 < 12 <= counts[1], counts


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv2d_derivatives_of_every_order_match_autograds_conv(float64, kernel, layout):
    import torch.nn.functional as F

    from models.nets.conv2d import conv2d

    pad = kernel // 2
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(4, 3, kernel, kernel).contiguous(memory_format=layout).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    f = lambda x, w, b: conv2d(x, w, b, padding=pad)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b)) and torch.autograd.gradgradcheck(f, (x, w, b))
    v, v2, v3 = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 3, 5, 5), torch.randn(4, 3, kernel, kernel)
    results = []
    for conv in (f, lambda x, w, b: F.conv2d(x, w, b, padding=pad)):
        gx, gw = torch.autograd.grad(conv(x, w, b), (x, w), v, create_graph=True)  # a vector-Jacobian product
        second = torch.autograd.grad((gx * v2).sum() + (gw * gw * v3).sum(), (x, w, b, v), create_graph=True,
                                     allow_unused=True)  # the Neumann gradient's order
        third = torch.autograd.grad(sum((t ** 2).sum() for t in second if t is not None), (x, w, v))
        results.append((gx, gw, *[t for t in second if t is not None], *third))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)
    g = lambda x, w: conv2d(x, w, None, padding=pad)  # noqa: E731  (no bias: every order too)
    assert torch.autograd.gradcheck(g, (x, w)) and torch.autograd.gradgradcheck(g, (x, w))


def test_conv2d_under_autocast_is_plain_conv2d():
    """Under bf16 autocast the closed-form functions would meet bf16 gradients against float32
    saved inputs: conv2d is F.conv2d there, forward and backward."""
    import torch.nn.functional as F

    from models.nets.conv2d import conv2d

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    out = []
    for conv in (conv2d, F.conv2d):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x, w, b, padding=1)
        out.append((y, *torch.autograd.grad(y.float().square().sum(), (x, w, b))))
    for a, c in zip(*out):
        torch.testing.assert_close(a, c)


def test_conv2d_vector_jacobian_product_skips_the_weight_gradient():
    """autograd.grad(y, x, v, create_graph=True) (the power series' products) builds the input
    gradient alone; a full backward builds both."""
    from models.nets import conv2d as module

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3).requires_grad_(), torch.randn(4, requires_grad=True)
    weight = w * 1.0  # a non-leaf weight, as the spectral norm's W / max(1, sigma / coeff)
    y = module.conv2d(x, weight, b, padding=1)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True, retain_graph=True)
    assert type(gx.grad_fn).__name__ == "_InputGradFnBackward"
    built = []
    original = module._WeightGradFn.forward
    try:
        module._WeightGradFn.forward = staticmethod(lambda ctx, *a: built.append(1) or original(ctx, *a))
        torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True, retain_graph=True)
        assert built == []
        torch.autograd.grad(y, (x, w), torch.ones_like(y), create_graph=True)
        assert built == [1]
    finally:
        module._WeightGradFn.forward = original


def test_a_plain_conv2d_vector_jacobian_product_skips_the_weight_gradient(monkeypatch):
    """autograd.grad(y, x, v) without create_graph (the power series' terms under the Neumann
    gradient, eval) asks aten for the input gradient alone; a backward to the weight asks for it."""
    from models.nets import conv2d as module

    masks = []
    original = module._grads
    monkeypatch.setattr(module, "_grads", lambda go, x, w, p, mask: masks.append(tuple(mask)) or original(go, x, w, p, mask))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3).requires_grad_(), torch.randn(4, requires_grad=True)
    y = module.conv2d(x, w * 1.0, b, padding=1)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
    assert masks == [(True, False)]
    torch.testing.assert_close(gx, torch.autograd.grad(torch.nn.functional.conv2d(x, w, b, padding=1).sum(), x)[0])
    y.sum().backward()
    assert masks[1:] == [(True, True)] and w.grad is not None and b.grad is not None


def test_the_eval_weight_cache_follows_the_weight():
    conv = SpectralNormConv2d(2, 3, 3, (2, 4, 4), coeff=0.5)
    conv.power_iteration()
    conv.eval()
    with torch.no_grad():
        cached = conv.normalized_weight()
        assert conv.normalized_weight() is cached  # sampling's fixed-point iterations reuse it
        conv.weight.mul_(3.0)  # an optimizer step or an EMA swap bumps the version
        fresh = conv.normalized_weight()
    assert fresh is not cached
    torch.testing.assert_close(fresh, conv.weight / torch.clamp(conv._eval_sigma() / 0.5, min=1.0))
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    conv(x).sum().backward()  # with autograd no cached (graph-less) weight is used
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    conv.train()  # training drops the copy
    assert conv._eval_weight_cache is None


def test_conv_adjoint_is_the_transpose_of_the_operator(float64):
    """W^T u (conv2d with the flipped kernel, channels swapped) is the adjoint of W v on one image:
    <W v, u> = <v, W^T u>, and equal to conv_transpose2d, for both channel orders and kernel sizes."""
    for c_in, c_out, k in [(2, 5, 3), (5, 2, 3), (3, 4, 5), (3, 4, 1)]:
        conv = SpectralNormConv2d(c_in, c_out, k, (c_in, 6, 7), init_iters=0)
        v, u = torch.randn(conv.v.numel()), torch.randn(conv.u.numel())
        w = conv.weight.detach()
        wv, wtu = conv._mv(w, v), conv._rmv(w, u)
        assert wv.shape == u.shape and wtu.shape == v.shape
        torch.testing.assert_close(torch.dot(wv, u), torch.dot(v, wtu))
        if k > 1:
            ref = torch.nn.functional.conv_transpose2d(u.reshape(1, c_out, 6, 7), w, padding=k // 2).reshape(-1)
            torch.testing.assert_close(wtu, ref)


def test_eval_sigma_reuses_vectors_that_passed_their_test_on_this_weight(float64, monkeypatch):
    """After the trainer's power_iterate stopped on its test for the current weight, eval mode takes
    sigma = u^T W v (what the next training forward uses) without another round; a changed weight,
    changed vectors or an iteration cut off by max_iters are iterated in eval mode as before."""
    def fresh(max_iters=500):
        torch.manual_seed(0)
        return SpectralNormConv2d(2, 3, 3, (2, 4, 4), coeff=0.5, atol=1e-4, rtol=1e-4, max_iters=max_iters, init_iters=0)

    steps = []
    real_step = SpectralNormBase._step_
    monkeypatch.setattr(SpectralNormBase, "_step_", lambda self, *a: steps.append(1) or real_step(self, *a))
    conv = fresh()
    conv.power_iteration()
    assert 1 < conv.last_iters < 500
    conv.eval()
    steps.clear()
    with torch.no_grad():
        sigma = conv._eval_sigma()
        assert steps == []  # no eval round: the stored vectors passed their test on this weight
        torch.testing.assert_close(sigma, conv.sigma())
        conv.weight.mul_(1.5)  # an EMA swap / a loaded checkpoint: the vectors may lag
        conv._eval_sigma()
        assert len(steps) >= 1
    # cut off by max_iters: not converged, so eval iterates (on local copies, buffers untouched)
    capped = fresh(max_iters=2)
    capped.power_iteration()
    assert capped.last_iters == 2
    u, v = capped.u.clone(), capped.v.clone()
    capped.eval()
    steps.clear()
    with torch.no_grad():
        capped._eval_sigma()
    assert len(steps) >= 1 and torch.equal(capped.u, u) and torch.equal(capped.v, v)


def test_lipschitz_constant_stays_below_coeff_after_training_steps():
    torch.manual_seed(0)
    model = tiny_resflow(coeff=0.98)
    x = images(8)
    model.data_init(x)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)  # large steps: weights grow past the coefficient
    for _ in range(5):
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step()
    assert model.diagnostics_summary()["sigma_over_coeff/max"] > 1.0  # the normalisation is active
    z = x / 256.0
    for t in model.transforms[1:]:
        if isinstance(t, InvertibleResidualBlock):
            lip = jacobian_spectral_norm(t.net, z.detach()).max().item()
            assert lip < 0.98, f"Lip(g) = {lip:.4f} >= coeff"
        with torch.no_grad():
            z, _ = t(z)


# ---- log-det estimators --------------------------------------------------------------------------

def test_roulette_weights_and_survival():
    assert survival("poisson", 2.0, 0) == 1.0
    assert survival("poisson", 2.0, 1) == pytest.approx(1 - math.exp(-2))
    assert survival("poisson", 2.0, 3) == pytest.approx(1 - math.exp(-2) * (1 + 2 + 2))
    assert survival("geometric", 0.5, 3) == pytest.approx(0.25)
    assert roulette_weights(2, 2, "poisson", 2.0)[:3] == [1.0, 1.0, 1.0]


def test_exact_estimator_matches_autograd_jacobian(float64):
    block = strong_block(estimator="exact", shape=(1, 3, 3), hidden=4)
    assert_ldj_matches_jacobian(block, torch.randn(2, 1, 3, 3), atol=1e-9)


@pytest.mark.parametrize("dist", ["poisson", "geometric"])
def test_roulette_estimator_is_unbiased(float64, dist):
    torch.manual_seed(1)
    block = linear_regime_block(estimator="roulette", dist=dist, n_exact=2)
    x = torch.randn(2, 2, 3, 3)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        exact = exact_logdet(block.net(xg), xg).detach()
    reps, calls = 64, 150
    means = []
    with torch.no_grad():
        for i in range(calls):
            torch.manual_seed(100 + i)  # seeded: N and the probes of call i
            _, ldj = block(x.repeat(reps, 1, 1, 1))
            means.append(ldj.reshape(reps, 2).mean(0))
    means = torch.stack(means)  # one N per call: calls are the independent samples
    mean, se = means.mean(0), means.std(0) / math.sqrt(calls)
    assert bool(((mean - exact).abs() <= 4 * se).all()), (mean, exact, se)
    assert bool((exact.abs() > 10 * se).all()), (exact, se)  # the test has power
    # i-ResNet's fixed truncation after 1 term (the trace) is biased: its expectation is tr(J)
    truncated = linear_regime_block(estimator="truncated", n_terms=1, dist=dist)
    truncated.load_state_dict(block.state_dict())
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        gx = truncated.net(xg)
        jac = torch.stack([torch.autograd.grad(gx.flatten(1)[:, i].sum(), xg, retain_graph=True)[0].flatten(1)
                           for i in range(18)], 1)
    trace = jac.diagonal(dim1=1, dim2=2).sum(1)
    assert bool(((trace - exact).abs() > 0.1).all()), (trace, exact)


def test_eval_mode_uses_the_test_time_exact_terms():
    block = strong_block(estimator="roulette", n_exact=2, n_exact_eval=20)
    x = torch.randn(2, 2, 3, 3)
    block.train()
    with torch.no_grad():
        block(x)
    assert 2 <= block.last_terms < 20  # 2 + N, N ~ Poisson(2)
    block.eval()
    with torch.no_grad():
        block(x)
    assert block.last_terms >= 20  # 20 + N
    # the model-level diagnostics report it
    model = tiny_resflow()
    model.data_init(images(8))
    model.eval()
    with torch.no_grad():
        model.log_prob(images(4))
    terms = [v for k, v in model.diagnostics().items() if k.endswith(".series_terms")]  # one per block
    assert len(terms) == len(blocks_of(model)) and min(terms) >= 20


def test_memory_efficient_backward_gives_the_same_gradient(float64):
    torch.manual_seed(0)
    model = tiny_resflow()
    x = images(8)
    model.data_init(x)
    grads = {}
    for name, mem, neumann in [("mem", True, True), ("plain", False, True), ("series", False, False)]:
        for b in blocks_of(model):
            b.mem_efficient, b.neumann_grad = mem, neumann
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        logp = model.log_prob(x)
        (-logp.mean()).backward()
        grads[name] = (logp.detach(), [p.grad.clone() for p in model.parameters()])
    for name in ("plain", "series"):
        assert torch.allclose(grads["mem"][0], grads[name][0], rtol=0, atol=1e-10)  # same value, same seed
    for a, b in zip(grads["mem"][1], grads["plain"][1]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    # the Neumann gradient is a different (unbiased) estimator than backprop through the series
    diff = max((a - b).abs().max().item() for a, b in zip(grads["mem"][1], grads["series"][1]))
    assert diff > 0


def test_memory_efficient_backward_refuses_unequal_weights():
    block = strong_block(estimator="roulette", mem_efficient=True)
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    y, ldj = block(x)
    with pytest.raises(RuntimeError, match="equal loss weights"):
        (ldj * torch.tensor([1.0, 2.0])).sum().backward()


# ---- inverse -----------------------------------------------------------------------------------

def test_fixed_point_inverse_reconstructs_to_tolerance(float64):
    for fc in (False, True):
        block = strong_block(fc=fc, inverse_atol=1e-10, inverse_rtol=1e-10, inverse_max_iters=1000)
        assert_invertible(block, torch.randn(4, 2, 3, 3), atol=1e-8)
        assert 1 < block.last_inverse_iters < 1000 and block.last_inverse_step < 1e-8
    block = strong_block(inverse_max_iters=3)  # the cap holds
    with torch.no_grad():
        block.inverse(torch.randn(4, 2, 3, 3))
    assert block.last_inverse_iters == 3


def test_model_inverse_and_sampling(float64):
    model = tiny_resflow(inverse_atol=1e-9, inverse_rtol=1e-9)
    model.data_init(images(16))
    model.eval()
    x = images(4)
    with torch.no_grad():
        y, _ = model.transforms[0](x)  # dequantize once; the rest is a bijection
        z = y
        for t in model.transforms[1:]:
            z, _ = t(z)
        y_rec = z
        for t in reversed(list(model.transforms)[1:]):
            y_rec = t.inverse(y_rec)
    assert (y_rec - y).abs().max().item() < 1e-6
    diag = model.diagnostics_summary()
    assert diag["inverse_iters/max"] >= 1 and diag["inverse_step/max"] < 1e-6
    samples = model.sample(3)
    assert samples.shape == (3, *SHAPE) and torch.isfinite(samples).all()


# ---- model -------------------------------------------------------------------------------------

def test_state_dict_carries_power_iteration_vectors(float64):
    torch.manual_seed(0)
    a = tiny_resflow()
    a.data_init(images(8))
    torch.manual_seed(1)
    b = tiny_resflow()
    b.load_state_dict(a.state_dict())
    assert any(k.endswith(".u") for k in a.state_dict())
    x = images(4)
    outs = []
    for m in (a, b):
        torch.manual_seed(3)
        outs.append(m.log_prob(x).detach())
    assert torch.equal(outs[0], outs[1])


def test_elementwise_actnorm(float64):
    layer = ActNorm(2, spatial_shape=(3, 3))
    layer(3.0 + 2.0 * torch.randn(16, 2, 3, 3))
    assert_invertible(layer, torch.randn(4, 2, 3, 3))
    assert_ldj_matches_jacobian(layer, torch.randn(2, 2, 3, 3), atol=1e-9)


def test_configs_resolve():
    for name in ("resflow_cifar10", "iresnet_cifar10", "resflow_small"):
        cfg = load_config(os.path.join(ROOT, "experiments", f"{name}.yaml"))
        assert cfg["model"]["name"] == "resflow"
    ires = load_config(os.path.join(ROOT, "experiments", "iresnet_cifar10.yaml"))["model"]
    assert ires["estimator"] == "truncated" and not ires["neumann_grad"]


# ---- training through the CLI ------------------------------------------------------------------

def test_training_lowers_test_bpd(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "train.py", "experiments/resflow_small.yaml", "--out", str(out),
            "model.steps=[1,1]", "model.hidden_channels=16", "model.fc_steps=1", "model.fc_hidden_channels=16",
            f"data.path={SUBSET}", "data.max_train=512", "data.max_test=32", "train.batch_size=16",
            "train.steps=20", "train.eval_every=20", "train.log_every=5", "train.lr=3e-3", "train.warmup_steps=0",
            "train.checkpoint_every=0", "train.sample_every=0", "eval.batch_size=32", "eval.max_examples=32",
            "train.layer_stats_every=10"]
    run_command(args)
    test_bpd = read_metric(out, "test/bpd")
    assert set(test_bpd) == {0, 20}
    assert test_bpd[20] < test_bpd[0] - 0.3, test_bpd
    series_terms = read_metric(out, "diag/series_terms/max")  # the blocks' own diagnostics, every log step
    assert set(series_terms) == {5, 10, 15, 20} and all(v >= 2 for v in series_terms.values())
    # train.layer_stats_every=10: per-layer log-det and output statistics, and each block's diagnostics
    ldj = read_metric(out, "layers/transforms.3.InvertibleResidualBlock/ldj_mean")
    rms = read_metric(out, "layers/transforms.3.InvertibleResidualBlock/out_rms")
    assert set(ldj) == set(rms) == {10, 20} and all(math.isfinite(v) and v > 0 for v in rms.values())
    assert set(read_metric(out, "layers/transforms.3.power_iters")) == {10, 20}


def _operator_matrix(layer) -> torch.Tensor:
    """The dense matrix of a spectral-normalised layer's linear map (its normalised weight, no bias)."""
    w = layer.normalized_weight().detach()
    if isinstance(layer, SpectralNormLinear):
        return w
    c, (h, wd) = layer.in_channels, layer.spatial
    basis = torch.eye(c * h * wd, dtype=w.dtype).reshape(-1, c, h, wd)
    cols = torch.nn.functional.conv2d(basis, w, padding=layer.padding).reshape(c * h * wd, -1)
    return cols.T


def _induced_norm_exact(a: torch.Tensor, p: float, q: float) -> float:
    """||A||_{p->q} exactly for p = 1 (largest column q-norm) or q = inf (largest row p*-norm)."""
    if p == 1:
        return torch.linalg.vector_norm(a, ord=q, dim=0).max().item()
    p_star = math.inf if p == 1 else (1.0 if p == math.inf else p / (p - 1))
    return torch.linalg.vector_norm(a, ord=p_star, dim=1).max().item()


@pytest.mark.parametrize("p,q", [(1.0, 1.0), (1.0, 2.0), (2.0, math.inf), (math.inf, math.inf), (1.0, math.inf)])
@pytest.mark.parametrize("kind", ["linear", "conv3", "conv1"])
def test_closed_form_1_and_inf_induced_norms_bound_the_operator(kind, p, q, float64):
    torch.manual_seed(0)
    if kind == "linear":
        layer = SpectralNormLinear(5, 4, coeff=0.7, domain=p, codomain=q)
    else:
        k = 3 if kind == "conv3" else 1
        layer = SpectralNormConv2d(2, 3, k, (2, 4, 5), coeff=0.7, domain=p, codomain=q)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.mul_(10.0)  # well above the coefficient, so normalisation is active
    a_raw = _operator_matrix(layer) * (layer.sigma().item() / 0.7)  # undo the rescaling
    assert layer.sigma().item() == pytest.approx(_induced_norm_exact(a_raw, p, q), rel=1e-10)
    assert _induced_norm_exact(_operator_matrix(layer), p, q) == pytest.approx(0.7, rel=1e-10)
    layer.eval()
    assert _induced_norm_exact(_operator_matrix(layer), p, q) == pytest.approx(0.7, rel=1e-10)


@pytest.mark.parametrize("norms", ["1", "i", "2i12"])
def test_resflow_builds_and_trains_with_1_and_inf_norms(norms):
    cfg = {**resflow.DEFAULTS, "steps": [1], "hidden_channels": 8, "fc_steps": 0, "lipschitz_norm": norms}
    model = build_model({"name": "resflow", **cfg}, (3, 8, 8), 8)
    x = torch.randint(0, 256, (4, 3, 8, 8))
    model.data_init(x)
    loss = -model.log_prob(x).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resume_continues_the_same_run(tmp_path):
    """Resuming restores weights, optimizer and the power-iteration vectors: the next losses match."""
    common = [sys.executable, "train.py", "experiments/resflow_small.yaml", "model.steps=[1,1]",
              "model.hidden_channels=8", "model.fc_steps=1", "model.fc_hidden_channels=8", f"data.path={SUBSET}",
              "data.max_train=256", "data.max_test=16", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0",
              "train.eval_every=0", "train.sample_every=0", "train.init_batch_size=16"]

    def run(out, *extra):
        run_command(common + ["--out", str(out), *extra])
        return read_metric(out, "train/bpd")

    straight = run(tmp_path / "a", "train.steps=4")
    run(tmp_path / "b", "train.steps=2", "train.checkpoint_every=2")
    resumed = run(tmp_path / "b", "train.steps=4", "--resume")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), (straight, resumed)
