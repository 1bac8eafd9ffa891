"""Flow++ (models/architectures/flowpp.py) and its layers: logistic-mixture CDF coupling,
splits, variational dequantization, the importance-weighted bound, the structure of the
paper's parameter count, and end-to-end training / evaluation through the CLIs on the
CIFAR-10 subset.  (Gradients, sampling, encode/decode and the paper configs' counts, for
Flow++ and its ablations: tests/test_contract.py.)"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

from engine.config import load_config
from models.architectures import build_model, flowpp
from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.flowpp_nets import FlowppCouplingNet, GatedAttention, glu
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.checkerboard import CheckerboardMerge, CheckerboardSplit
from models.transforms.bijections.conv1x1 import InvertibleConv1x1
from models.transforms.bijections.elementwise import Logit, ScaleShift, Sigmoid
from models.transforms.bijections.halves import Halfwise, SwapHalves
from models.transforms.bijections.mixture_logistic import (
    MixtureLogisticCoupling, mixture_inverse_logit_cdf, mixture_log_cdf, mixture_log_pdf, mixture_log_sf,
    mixture_logit_cdf)
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.variational_dequantization import VariationalDequantization
from tests.helpers import (SUBSET, assert_invertible, assert_ldj_matches_jacobian, jacobian_logdet, read_metric,
                           run_command)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {"steps": [1, 1, 1], "hidden_channels": 8, "hidden_blocks": 1, "heads": 2, "components": 3, "dropout": 0.0}
TINY_DEQ = {"kind": "variational", "steps": 1, "hidden_channels": 8, "hidden_blocks": 1, "heads": 2, "components": 3,
            "dropout": 0.0, "context_channels": 4, "context_blocks": 1}


def tiny_flowpp(dequantizer: dict | None = None, **overrides) -> Flow:
    """Flow++ on 3x4x4 images with every piece of the paper model at toy width; ActNorm initialised."""
    cfg = {"name": "flowpp", **flowpp.DEFAULTS, **TINY, **overrides}
    model = build_model(cfg, (3, 4, 4), 8, {**TINY_DEQ, **(dequantizer or {})}).to(torch.get_default_dtype())
    model.data_init(random_images(16))
    return model


def random_images(n, shape=(3, 4, 4), n_bits=8):
    return torch.randint(0, 2 ** n_bits, (n, *shape)).to(torch.get_default_dtype())


# ---- parameter counts (meta device: no memory, fast; each config's total: tests/test_contract.py) ---------

def test_main_flow_and_dequantizer_counts_add_up():
    """The hand count of the official structure (per coupling: pos_emb + proj_in + blocks + proj_out)."""
    cfg = load_config(os.path.join(ROOT, "experiments", "flowpp_cifar10.yaml"))
    with torch.device("meta"):
        model = build_model(cfg["model"], (3, 32, 32), 8, cfg["dequantizer"])
    deq = sum(p.numel() for p in model.transforms[0].parameters())
    block = 9 * 192 * 96 + 96 + 192 * 192 + 192 + 96 * 288 + 288 + 96 * 192 + 192 + 4 * 96  # gated conv, attn, 2 LN

    def coupling(c, h, w, blocks, ctx=0):
        extra = (2 * ctx * 96 + 96) if ctx else 0
        return h * w * 96 + 9 * c * 96 + 96 + blocks * (block + extra) + 9 * 96 * c * 98 + c * 98

    def step(c, h, w, blocks=10, ctx=0):  # per-element norm of both halves + two c x c convs + coupling
        return 2 * 2 * c * h * w + 2 * c * c + coupling(c, h, w, blocks, ctx)

    main = 4 * step(3, 32, 16) + 2 * step(6, 16, 16) + 3 * step(12, 16, 8)
    context = 9 * 6 * 32 + 32 + 3 * (9 * 64 * 32 + 32 + 9 * 64 * 64 + 64)
    assert deq == 4 * step(3, 32, 16, blocks=2, ctx=32) + context == 3_466_976
    assert sum(p.numel() for p in model.parameters()) - deq == main == 27_976_464


# ---- mixture CDF and its inverse -----------------------------------------------------------------

def _mixtures(n, k, sharp, gen):
    logits = torch.randn(n, k, generator=gen) * (20.0 if sharp else 1.0)
    means = torch.randn(n, k, generator=gen) * (50.0 if sharp else 2.0)
    log_scales = (torch.rand(n, k, generator=gen) * 10 - 7) if sharp else torch.randn(n, k, generator=gen)
    return logits, means, log_scales


@pytest.mark.parametrize("sharp", [False, True])
def test_mixture_cdf_inverse_float32_extreme_inputs(sharp):
    gen = torch.Generator().manual_seed(1)
    n, k = 2000, 32
    logits, means, log_scales = _mixtures(n, k, sharp, gen)
    x = torch.cat([torch.randn(n // 4, generator=gen) * 3,                         # typical
                   torch.randn(n // 4, generator=gen) * 1e3,                       # far outside
                   torch.tensor([-1e6, 1e6, -3e4, 3e4]).repeat(n // 16),           # extreme
                   means[3 * n // 4:, 0] + 1e-3 * torch.randn(n // 4, generator=gen)])  # on (sharp) modes
    assert x.shape == (n,) and x.dtype == torch.float32
    y = mixture_logit_cdf(x, logits, means, log_scales)
    assert torch.isfinite(y).all()
    x_rec, iters = mixture_inverse_logit_cdf(y, logits, means, log_scales)
    assert x_rec.dtype == torch.float32 and torch.isfinite(x_rec).all() and iters <= 200
    # (a) the root is found to float32 precision: y lies between the images of x_rec's float32 neighbours
    below = mixture_logit_cdf(torch.nextafter(x_rec, torch.tensor(-math.inf)), logits, means, log_scales)
    above = mixture_logit_cdf(torch.nextafter(x_rec, torch.tensor(math.inf)), logits, means, log_scales)
    tol = 1e-5 * (1 + y.abs())
    assert ((below <= y + tol) & (above >= y - tol)).all(), ((below - y).max(), (y - above).max())
    # (b) x itself is recovered wherever the map is not flat in float32 (density above float32 resolution of y)
    slope = torch.exp(mixture_log_pdf(x.double(), logits.double(), means.double(), log_scales.double())
                      - mixture_log_cdf(x.double(), logits.double(), means.double(), log_scales.double())
                      - mixture_log_sf(x.double(), logits.double(), means.double(), log_scales.double()))
    ok = slope > 1e-2
    assert ok.float().mean() > 0.4
    err = (x_rec - x).abs()[ok]
    assert (err <= 1e-4 * (1 + x.abs()[ok]) / slope[ok].clamp(max=1).float()).all(), err.max()


def test_mixture_inverse_of_saturated_targets_stays_finite():
    logits, means, log_scales = torch.zeros(3, 4), torch.tensor([[-1., 0., 1., 2.]] * 3), torch.full((3, 4), -7.0)
    y = torch.tensor([-1e30, 0.0, 1e30])
    x, _ = mixture_inverse_logit_cdf(y, logits, means, log_scales)
    assert torch.isfinite(x).all() and x[0] < -1 and x[2] > 2


# ---- layers: invertibility and log-det against autograd -------------------------------------------

def _coupling(components=3, context_channels=0, attention=True, c=4, hw=(2, 2)):
    net = FlowppCouplingNet(c // 2, (c // 2) * (2 + 3 * components), hw, filters=8, blocks=1, heads=2,
                            context_channels=context_channels, attention=attention)
    with torch.no_grad():  # a larger output layer than at init: a clearly non-trivial map
        net.proj_out.weight.mul_(10.0)
        net.proj_out.bias.normal_(0, 0.5)
    return MixtureLogisticCoupling(net, c // 2, components)


LAYERS = {
    "mixlog_coupling": lambda: (_coupling(), None),
    "mixlog_coupling_context": lambda: (_coupling(context_channels=3), torch.randn(1, 3, 2, 2)),  # shared by the batch
    "affine_coupling": lambda: (_coupling(components=0), None),
    "mixlog_coupling_no_attention": lambda: (_coupling(attention=False), None),
    "per_element_actnorm": lambda: (ActNorm(4, spatial_shape=(2, 2)), None),
    "halfwise_conv1x1": lambda: (Halfwise(InvertibleConv1x1(2, "noisy_identity"), InvertibleConv1x1(2)), None),
    "swap_halves": lambda: (SwapHalves(), None),
    "checkerboard_split": lambda: (CheckerboardSplit(), None),
    "checkerboard_merge": lambda: (CheckerboardMerge(), None),
    "sigmoid": lambda: (Sigmoid(), None),
    "squeeze_tf_order": lambda: (Squeeze(order="tf"), None),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_invertible_and_ldj_matches_jacobian(name, float64):
    layer, context = LAYERS[name]()
    x = torch.randn(2, 4, 2, 2) * 2
    assert_invertible(layer, x, atol=1e-9, context=context)
    assert_ldj_matches_jacobian(layer, x, atol=1e-8, rtol=1e-10, context=context)


def test_coupling_keeps_the_conditioning_half_and_inverts_in_float32():
    layer = _coupling()
    x = torch.randn(8, 4, 2, 2) * 3
    z, ldj = layer(x)
    assert torch.equal(z[:, :2], x[:, :2]) and not torch.allclose(z[:, 2:], x[:, 2:]) and ldj.dtype == torch.float32
    assert (layer.inverse(z) - x).abs().max() < 1e-4


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_glu_is_torchs_and_keeps_the_layout_of_its_gradient(layout, float64):
    x = torch.randn(2, 6, 3, 5).contiguous(memory_format=layout).requires_grad_()
    gy = torch.randn(2, 3, 3, 5).contiguous(memory_format=layout)
    y = glu(x)
    assert torch.allclose(y, torch.nn.functional.glu(x, dim=1)) and y.is_contiguous(memory_format=layout)
    (g,) = torch.autograd.grad(y, x, gy)
    (g_torch,) = torch.autograd.grad(torch.nn.functional.glu(x, dim=1), x, gy)
    assert torch.allclose(g, g_torch) and g.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gated_attention_is_multi_head_attention_over_positions(layout, float64):
    """softmax(Q K^T / sqrt(d)) V per head, the 3C channels of the first projection split as
    (q | k | v, head, d), the heads' outputs concatenated head-major, then the gated projection."""
    torch.manual_seed(0)
    layer = GatedAttention(8, heads=2).eval()
    x = torch.randn(2, 8, 3, 4).contiguous(memory_format=layout)
    pos = torch.randn(1, 8, 3, 4)
    qkv = layer.proj1(x + pos).reshape(2, 3, 2, 4, 12)  # (B, q|k|v, head, d, T)
    q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, head, T, d)
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # d = 4
    a = att.transpose(-1, -2).reshape(2, 8, 3, 4)
    expected = x + torch.nn.functional.glu(layer.proj2(a), dim=1)
    assert torch.allclose(layer(x, pos), expected, atol=1e-12)


def test_checkerboard_halves_are_column_parity(float64):
    x = torch.arange(2 * 4 * 4).reshape(1, 2, 4, 4).double()
    z, _ = CheckerboardSplit()(x)
    assert torch.equal(z[:, :2], x[..., 0::2]) and torch.equal(z[:, 2:], x[..., 1::2])


def test_squeeze_tf_order_matches_space_to_depth(float64):
    x = torch.arange(2 * 4 * 4).reshape(1, 2, 4, 4).double()
    z, _ = Squeeze(order="tf")(x)
    for i in range(2):
        for j in range(2):
            assert torch.equal(z[:, (2 * i + j) * 2:(2 * i + j + 1) * 2], x[:, :, i::2, j::2])


# ---- variational dequantization ---------------------------------------------------------------------

def test_variational_dequantization_stays_in_bins_and_floors_back():
    model = tiny_flowpp()
    deq = model.transforms[0]
    assert isinstance(deq, VariationalDequantization) and deq.stochastic_forward and not deq.bijective
    x = random_images(32)
    x[0] = 0
    x[1] = 255
    y, ldj = deq(x)
    u = y * 256 - x
    assert (u >= 0).all() and (u < 1).all() and ((u > 0) & (u < 1)).float().mean() > 0.99
    assert torch.equal(deq.inverse(y), x)
    assert ldj.shape == (32,) and torch.isfinite(ldj).all()


def test_variational_dequantization_log_q_is_change_of_variables(float64):
    """-ldj - D log K equals log N(eps) - log|det d u / d eps| computed by autograd."""
    model = tiny_flowpp()
    deq = model.transforms[0]
    x = random_images(1)
    torch.manual_seed(5)
    _, ldj = deq(x)
    torch.manual_seed(5)
    context = deq.context_net(x / 256 - 0.5)
    eps = torch.randn_like(x)

    def flow(e, i):
        u = e
        for t in deq.flow:
            u, _ = t(u, context[i:i + 1])
        return u

    log_q = []
    for i in range(1):
        logdet = jacobian_logdet(lambda e: flow(e, i), eps[i:i + 1])
        log_q.append(-0.5 * (eps[i] ** 2).sum() - 0.5 * eps[i].numel() * math.log(2 * math.pi) - logdet[0])
    expected = -48 * math.log(256) - torch.stack(log_q)
    assert torch.allclose(ldj, expected, atol=1e-8), (ldj, expected)


class _NoContext(nn.Module):
    def forward(self, x):
        return None


def test_iw_bound_rises_to_the_exact_log_probability(float64):
    """A 1-pixel, 2-bit model whose P(x) is known in closed form.

    y = (x + u) / 4 -> logit -> (z - mu) / s -> N(0, 1), so p(y) has
    P(x) = Phi((logit((x+1)/4) - mu)/s) - Phi((logit(x/4) - mu)/s).  q(u|x) = sigmoid(2 N(0, 1))
    (U-shaped, not the posterior), so the single-sample bound is clearly below log P(x) on
    average; the importance-weighted bound rises with K and reaches it.  (With sigmoid(N(0, 1))
    the weights p/q have infinite variance at the bin edges and the IW bound converges slowly.)
    """
    mu, s = 0.3, 0.8
    deq = VariationalDequantization([ScaleShift(2.0, 0.0), Sigmoid()], _NoContext(), num_bits=2)
    model = Flow([deq, Logit(0.0), ScaleShift(1 / s, -mu / s)], StandardNormal((1, 1, 1)), (1, 1, 1))
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    logit = lambda p: math.log(p) - math.log1p(-p) if 0 < p < 1 else (-math.inf if p == 0 else math.inf)  # noqa: E731
    exact = torch.tensor([math.log(phi((logit((v + 1) / 4) - mu) / s) - phi((logit(v / 4) - mu) / s)) for v in range(4)])
    assert abs(torch.logsumexp(exact, 0).item()) < 1e-12  # the 4 bins carry all the mass

    x = torch.arange(4.0).reshape(4, 1, 1, 1).repeat(500, 1, 1, 1)  # 500 seeds per value
    ks = [1, 4, 16, 64, 256]
    gaps = []
    for k in ks:
        lp = model.log_prob_iw(x, k, chunk=64).reshape(500, 4).mean(0)
        gaps.append((exact - lp).mean().item())
    assert gaps[0] > 0.5, gaps                                           # the K=1 bound is below log P(x)
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps              # the IW bound rises with K
    assert abs(gaps[-1]) < 0.005, gaps                                   # and ends within 0.005 nats of it


def test_flowpp_iw_bound_is_above_the_single_sample_bound():
    model = tiny_flowpp().eval()
    x = random_images(4)
    single = torch.stack([model.log_prob(x) for _ in range(8)]).double().mean(0)
    iw = model.log_prob_iw(x, 32, chunk=32)
    assert iw.shape == (4,) and (iw.mean() > single.mean())


def test_log_prob_iw_of_a_deterministic_model_is_log_prob(float64):
    model = Flow([Logit(0.0)], StandardNormal((1, 1, 1)), (1, 1, 1))
    x = torch.rand(5, 1, 1, 1)
    assert not model.is_stochastic
    assert torch.allclose(model.log_prob_iw(x, 10), model.log_prob(x))


# ---- the whole model ----------------------------------------------------------------------------------

def test_flow_after_the_dequantizer_inverts_to_float64_precision(float64):
    """The continuous part of encode/decode (bisection inverse of the mixture CDF) to 1e-9; the
    integer round trip and sampling: tests/test_contract.py."""
    model = tiny_flowpp().eval()
    with torch.no_grad():
        x = random_images(4)
        y, _ = model.transforms[0](x)
        z = y
        for t in model.transforms[1:]:
            z, _ = t(z)
        for t in reversed(model.transforms[1:]):
            z = t.inverse(z)
        assert (z - y).abs().max() < 1e-9


def test_glow_with_variational_dequantization_from_its_config():
    """Any continuous family selects its dequantizer with dequantizer.kind (here Glow, paper-size dequantizer)."""
    cfg = load_config(os.path.join(ROOT, "experiments", "glow_small.yaml"),
                      ["model.levels=2", "model.steps=1", "model.hidden_channels=8", "dequantizer.kind=variational"])
    assert cfg["dequantizer"]["steps"] == 4 and cfg["dequantizer"]["hidden_channels"] == 96  # the paper's q
    model = build_model(cfg["model"], (3, 4, 4), 8, cfg["dequantizer"])
    assert isinstance(model.transforms[0], VariationalDequantization) and model.is_stochastic
    x = random_images(4)
    model.data_init(x)
    logp = model.log_prob(x)
    assert logp.shape == (4,) and torch.isfinite(logp).all()
    (-logp.mean()).backward()
    assert all(p.grad is not None for p in model.transforms[0].parameters())


def test_image_size_must_divide_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model({"name": "flowpp", **flowpp.DEFAULTS, **TINY}, (3, 6, 6), 8)


# ---- CLIs on the CIFAR-10 subset ----------------------------------------------------------------------

CLI_TINY = [
    "model.steps=[1,1,1]", "model.hidden_channels=8", "model.hidden_blocks=1", "model.heads=2", "model.components=4",
    "dequantizer.steps=1", "dequantizer.hidden_channels=8", "dequantizer.hidden_blocks=1", "dequantizer.heads=2",
    "dequantizer.components=4", "dequantizer.context_channels=8", "dequantizer.context_blocks=1", f"data.path={SUBSET}", "data.max_train=512", "data.max_test=32",
    "train.batch_size=16", "train.init_batch_size=64", "train.lr=2e-3", "train.warmup_steps=0", "train.log_every=1",
    "train.sample_every=0", "train.checkpoint_every=0", "eval.batch_size=32", "sample.n=4",
    "sample.temperatures=[0.7]",
]


def _run(args):
    return run_command([sys.executable, *args])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flowpp") / "run"
    _run(["train.py", "experiments/flowpp_small.yaml", "--out", str(out), *CLI_TINY,
          "train.steps=30", "train.eval_every=30"])
    return out


def test_training_the_small_config_lowers_test_bpd(trained_run):
    test_bpd = read_metric(trained_run, "test/bpd")
    assert set(test_bpd) == {0, 30}
    assert test_bpd[30] < test_bpd[0] - 0.3, test_bpd


def test_eval_iw_samples_round_trip(trained_run, tmp_path):
    js = tmp_path / "eval.json"
    proc = _run(["eval.py", str(trained_run), "--iw-samples", "6", "--iw-chunk", "4", "--max-examples", "16",
                 "--json", str(js)])
    r = json.load(open(js))
    assert r["n"] == 16 and r["bound"] == "single-sample (K=1)" and r["stochastic"] is True
    assert r["iw"]["k"] == 6 and r["iw"]["n"] == 16 and r["iw"]["nonfinite"] == 0
    # the IW bound is tighter in expectation; on 16 images of a 30-step model one draw each is noisy
    assert math.isfinite(r["iw"]["bpd"]) and r["iw"]["bpd"] < r["bpd"] + 0.05 and r["bpd"] < 9.0
    assert f"{r['bpd']:.4f} ± {r['stderr']:.4f}" in proc.stdout and "single-sample (K=1) bound" in proc.stdout
    assert f"test bpd (IW, K=6): {r['iw']['bpd']:.4f}" in proc.stdout
