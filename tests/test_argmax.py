"""Argmax flows and SurVAE surjections (models/transforms/surjections/argmax.py, augmentation.py,
conditional_noise.py; models/architectures/argmax.py and ``dequantizer.kind=argmax``).

The bound tests use models whose exact log P(x) is known: a categorical variable lifted by the
argmax surjection onto a fixed diagonal Gaussian, where P(x) is the Gaussian mass of x's region
(an orthant for the binary encoding, {z_x > z_i} for one-hot, by 1-D quadrature); and a
Gaussian augmented by one learned dimension, where p(x) and the gap KL(q || p(u|x)) are closed form.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

from engine.config import load_config
from models.architectures import argmax, build_model, glow
from models.builders.dequantizer import build_dequantizer
from models.core.distributions import LearnedGaussian, StandardNormal
from models.core.flow import Flow
from models.transforms.bijections.conv1x1 import InvertibleConv1x1
from models.transforms.surjections.argmax import ArgmaxSurjection, BinaryEncoding, OneHotEncoding
from models.transforms.surjections.augmentation import Augmentation
from models.transforms.surjections.conditional_noise import ConditionalAffine, ConditionalNoise
from tests.helpers import (ROOT, SUBSET, assert_all_parameters_get_gradient, assert_ldj_matches_jacobian,
                           jacobian_logdet, read_metric, run_command)

ENCODINGS = {"onehot": OneHotEncoding, "binary": BinaryEncoding}


def affine_noise(dims: int, scale: float = 1.0) -> ConditionalNoise:
    """q(v | x) = N(m(x), exp(s(x))^2) with (m, s) a 1x1 conv of the encoding's features of x."""
    net = nn.Conv2d(dims, 2 * dims, 1)
    with torch.no_grad():
        net.weight.mul_(scale)
        net.bias.mul_(scale)
    return ConditionalNoise([ConditionalAffine(net)], nn.Identity(), dims)


def surjection(encoding: str, num_classes: int, channels: int = 1, scale: float = 1.0) -> ArgmaxSurjection:
    code = ENCODINGS[encoding](num_classes)
    return ArgmaxSurjection(code, affine_noise(channels * code.dims, scale))


# ---- the surjection: argmax(z) == x by construction ------------------------------------------------

@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("num_classes", [2, 3, 4, 5, 7, 8, 9, 16, 256])
def test_every_sample_of_q_decodes_to_x(encoding, num_classes):
    """Wide noise (v spread over hundreds) makes near-ties and softplus underflow likely; still exact."""
    layer = surjection(encoding, num_classes, channels=3, scale=3.0)
    x = torch.randint(0, num_classes, (64, 3, 4, 4))
    x[0].view(-1)[:min(48, num_classes)] = torch.arange(min(48, num_classes))  # every category (up to 48)
    x[1] = num_classes - 1
    with torch.no_grad():
        z, ldj = layer(x)
    e = layer.encoding.dims
    assert z.shape == (64, 3 * e, 4, 4) == (64, *layer.output_shape((3, 4, 4))) and ldj.shape == (64,)
    assert torch.isfinite(z).all() and torch.isfinite(ldj).all()
    assert torch.equal(layer.inverse(z).long(), x)
    zz = z.reshape(64, 3, e, 4, 4)
    if encoding == "onehot":
        assert torch.equal(zz.argmax(dim=2), x)
        others = zz.masked_fill(nn.functional.one_hot(x, num_classes).movedim(-1, 2).bool(), -math.inf)
        assert (others.amax(dim=2) < zz.gather(2, x.unsqueeze(2)).squeeze(2)).all()  # strictly, no ties
    else:
        assert (zz != 0).all() and torch.equal((zz > 0).long(), layer.encoding.bits(x))


def test_near_ties_and_underflow_still_decode(float64):
    """v far above v_x (softplus(T - v) rounds to 0) and v << 0 (softplus(v) underflows)."""
    onehot = OneHotEncoding(3)
    v = torch.tensor([0.0, 1e3, -1e3]).reshape(1, 1, 3, 1, 1).float()
    x = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    z, _ = onehot.threshold(v, x)
    assert torch.equal(onehot.decode(z), x) and (z[0, 0, 1:] < z[0, 0, 0]).all()
    binary = BinaryEncoding(4)
    z, ldj = binary.threshold(torch.full((1, 1, 2, 1, 1), -1e4), torch.tensor([[[[2]]]]))
    assert torch.equal(binary.decode(z), torch.tensor([[[[2]]]])) and torch.isfinite(ldj).all()


@pytest.mark.parametrize("num_classes", list(range(2, 70)) + [255, 256, 257])
def test_binary_encoding_round_trips_every_category(num_classes):
    code = BinaryEncoding(num_classes)
    assert code.dims == math.ceil(math.log2(num_classes)) and 2 ** code.dims >= num_classes > 2 ** (code.dims - 1)
    x = torch.arange(num_classes).reshape(1, num_classes, 1, 1)
    signs = code.features(x, torch.float32)
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(code.decode(signs), x)
    assert len({tuple(s) for s in signs[0].reshape(num_classes, -1).tolist()}) == num_classes  # distinct codes
    # codes >= K (no mass under q) decode to the last category, as documented
    extra = torch.arange(num_classes, 2 ** code.dims).reshape(1, -1, 1, 1)
    if extra.numel():
        bits = (extra.unsqueeze(2) // 2 ** torch.arange(code.dims - 1, -1, -1).view(-1, 1, 1)) % 2
        assert (code.decode(2.0 * bits - 1) == num_classes - 1).all()


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_threshold_log_det_matches_jacobian(encoding, float64):
    code = ENCODINGS[encoding](5)
    x = torch.tensor([0, 3, 4]).reshape(3, 1, 1, 1)
    v = 2 * torch.randn(3, code.dims)
    _, log_det = code.threshold(v.reshape(3, 1, code.dims, 1, 1), x)
    for i in range(3):
        expected = jacobian_logdet(lambda w: code.threshold(w.reshape(1, 1, code.dims, 1, 1), x[i:i + 1])[0], v[i:i + 1])
        assert torch.allclose(log_det[i], expected[0], atol=1e-10), (log_det[i], expected)


def test_conditional_affine_log_det_matches_jacobian(float64):
    layer = ConditionalAffine(nn.Conv2d(3, 4, 1))
    context = torch.randn(1, 3, 2, 2)  # shared by the batch (the helper runs examples one by one)
    assert_ldj_matches_jacobian(layer, torch.randn(2, 2, 2, 2), atol=1e-10, context=context)
    z, _ = layer(torch.randn(2, 2, 2, 2), context)
    assert torch.allclose(layer(layer.inverse(z, context), context)[0], z)


def test_surjection_ldj_is_minus_log_q_of_z(float64):
    """ldj = -log q(v | x) + log|det d threshold / d v| with q(v | x) a Gaussian known in closed form."""
    layer = surjection("onehot", 4)
    x = torch.tensor([2]).reshape(1, 1, 1, 1)
    torch.manual_seed(3)
    _, ldj = layer(x)
    torch.manual_seed(3)
    eps = torch.randn(1, 4, 1, 1)
    h = layer.noise.flow[0].net(layer.encoding.features(x, torch.float64).reshape(1, 4, 1, 1))
    mean, log_std = h[:, 0::2], h[:, 1::2]
    v = mean + torch.exp(log_std) * eps
    log_q_v = (-0.5 * eps ** 2 - 0.5 * math.log(2 * math.pi) - log_std).sum()
    _, log_det = layer.encoding.threshold(v.reshape(1, 1, 4, 1, 1), x)
    assert torch.allclose(ldj, log_det - log_q_v, atol=1e-10)


# ---- the bound on a tiny categorical distribution with exact log P(x) --------------------------------

class _Fixed(nn.Module):
    """A prior net returning fixed (mean, log-std) pairs: a diagonal Gaussian base."""

    def __init__(self, mean, log_std):
        super().__init__()
        self.h = nn.Parameter(torch.stack([mean, log_std], 1).reshape(1, -1, 1, 1))

    def forward(self, zeros):
        return self.h


def exact_log_p(code, mean, std):
    """log P(x) for every x: the N(mean, std^2) mass of x's region of the encoding."""
    k = code.num_classes
    if isinstance(code, BinaryEncoding):
        signs = code.features(torch.arange(k).reshape(k, 1, 1, 1), torch.float64).reshape(k, -1)
        return torch.special.log_ndtr(signs * mean / std).sum(1)
    t = torch.linspace(-15, 15, 30001, dtype=torch.float64)  # z_x = mean_x + std_x t
    out = []
    for x in range(k):
        integrand = torch.exp(-0.5 * t ** 2) / math.sqrt(2 * math.pi)
        for i in range(k):
            if i != x:
                integrand = integrand * torch.special.ndtr((mean[x] + std[x] * t - mean[i]) / std[i])
        out.append(torch.trapezoid(integrand, t).log())
    return torch.stack(out)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("num_classes", [3, 5, 8])
def test_bound_below_exact_log_p_and_iw_rises_towards_it(encoding, num_classes, float64):
    code = ENCODINGS[encoding](num_classes)
    e = code.dims
    mean, log_std = torch.randn(e), 0.3 * torch.randn(e)
    model = Flow([ArgmaxSurjection(code, affine_noise(e))], LearnedGaussian((e, 1, 1), _Fixed(mean, log_std)), (1, 1, 1))
    exact = exact_log_p(code, mean, log_std.exp())
    total = torch.logsumexp(exact, 0).item()
    assert abs(total) < 1e-6 if encoding == "onehot" or num_classes == 8 else total < -1e-3  # lost codes >= K

    model.base.requires_grad_(False)  # fit q(v | x) by the bound, so the IW bound converges quickly
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.arange(num_classes, dtype=torch.float64).reshape(-1, 1, 1, 1).repeat(64, 1, 1, 1)
    for _ in range(200):
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()

    n = 200
    x = torch.arange(num_classes, dtype=torch.float64).reshape(-1, 1, 1, 1).repeat(n, 1, 1, 1)
    single = model.log_prob_iw(x, 1).reshape(n, num_classes).mean(0)
    assert (single < exact).all(), (single, exact)                     # the bound, for every category
    gaps = [(exact - model.log_prob_iw(x, k, chunk=64).reshape(n, num_classes).mean(0)).mean().item()
            for k in (1, 4, 16, 64, 256)]
    assert gaps[0] > 0.02, gaps
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps            # rises with the number of samples
    assert -0.005 < gaps[-1] < 0.04, gaps                              # to (just below) log P(x)


# ---- augmentation (VFlow) ------------------------------------------------------------------------------

def test_augmentation_bound_is_log_p_minus_kl_and_iw_rises(float64):
    """x (1-D) augmented by u ~ q(u|x), then z = W [x, u] ~ N(0, I): [x, u] ~ N(0, S), S = W^-1 W^-T.
    q(u|x) = N(posterior mean + 0.5, (1.5 posterior std)^2), so E[bound] = log p(x) - KL(q || p(u|x))."""
    w = torch.tensor([[1.0, 0.5], [-0.8, 1.2]])
    cov = torch.linalg.inv(w) @ torch.linalg.inv(w).T
    coef, post_var = cov[1, 0] / cov[0, 0], cov[1, 1] - cov[1, 0] ** 2 / cov[0, 0]
    post_std = post_var.sqrt()
    net = nn.Conv2d(1, 2, 1)
    conv = InvertibleConv1x1(2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([coef, 0.0]).reshape(2, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.5, math.log(1.5 * post_std)]))
        conv.weight.copy_(w)
    aug = Augmentation(ConditionalNoise([ConditionalAffine(net)], nn.Identity(), 1))
    model = Flow([aug, conv], StandardNormal((2, 1, 1)), (1, 1, 1))
    assert aug.output_shape((1, 1, 1)) == (2, 1, 1) and aug.stochastic_forward and not aug.bijective

    xs = torch.tensor([-1.5, 0.0, 2.0])
    exact = -0.5 * xs ** 2 / cov[0, 0] - 0.5 * math.log(2 * math.pi * cov[0, 0])
    kl = math.log(1 / 1.5) + (1.5 ** 2 * post_var + 0.25) / (2 * post_var) - 0.5
    n = 2000
    x = xs.reshape(3, 1, 1, 1).repeat(n, 1, 1, 1)
    with torch.no_grad():
        z, _ = aug(x)
    assert torch.equal(aug.inverse(z), x)                               # slicing drops u
    single = model.log_prob(x).reshape(n, 3)
    assert torch.allclose(single.mean(0), exact - kl, atol=4 * single.std(0).max().item() / math.sqrt(n))
    assert (single.mean(0) < exact).all()
    gaps = [(exact - model.log_prob_iw(x[:600], k, chunk=64).reshape(200, 3).mean(0)).mean().item()
            for k in (1, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and -0.002 < gaps[-1] < 0.01, gaps
    assert_all_parameters_get_gradient(model, -model.log_prob(x[:16]).mean())


# ---- models -----------------------------------------------------------------------------------------------

TINY = {"levels": 2, "steps": 1, "hidden_channels": 8}
TINY_DEQ = {"steps": 1, "hidden_channels": 8, "hidden_blocks": 1, "components": 3, "heads": 2, "context_channels": 4,
            "context_blocks": 1}


def tiny_argmax(num_bits: int, encoding: str = "binary", **overrides) -> Flow:
    cfg = {"name": "argmax", **argmax.DEFAULTS, **TINY, **overrides}
    return build_model(cfg, (3, 4, 4), num_bits, {**TINY_DEQ, "kind": "argmax", "encoding": encoding})


@pytest.mark.parametrize("encoding,num_bits,channels", [("binary", 8, 24), ("binary", 1, 3), ("onehot", 2, 12)])
def test_argmax_model_shapes_bound_and_samples(encoding, num_bits, channels):
    model = tiny_argmax(num_bits, encoding=encoding)
    assert isinstance(model.transforms[0], ArgmaxSurjection) and model.is_stochastic
    assert model.transforms[0].output_shape((3, 4, 4)) == (channels, 4, 4) and model.num_dims == 48
    x = torch.randint(0, 2 ** num_bits, (8, 3, 4, 4)).to(torch.uint8)  # the trainer's dtype
    model.data_init(x)
    model.eval()
    logp = model.log_prob(x)
    assert logp.shape == (8,) and torch.isfinite(logp).all() and (logp < 0).all()
    assert model.log_prob_iw(x, 16, chunk=8).mean() > torch.stack([model.log_prob(x) for _ in range(4)]).mean()
    s = model.sample(5)
    assert s.shape == (5, 3, 4, 4) and torch.equal(s, s.round()) and s.min() >= 0 and s.max() < 2 ** num_bits


def test_glow_selects_the_argmax_dequantizer_from_its_config():
    """dequantizer.kind=argmax under Glow (Flow++'s paper-size noise flow; too big for the tiny
    contract models: gradients of every parameter of the argmax family, binary and one-hot, and of
    Flow++ with the argmax dequantizer are checked in tests/test_contract.py)."""
    model = build_model({"name": "glow", **glow.DEFAULTS, "levels": 2, "steps": 1, "hidden_channels": 8},
                        (3, 4, 4), 3, {"kind": "argmax"})
    assert isinstance(model.transforms[0], ArgmaxSurjection) and model.likelihood_kind == "bound"
    assert model.transforms[0].encoding.num_classes == 8
    x = torch.randint(0, 8, (4, 3, 4, 4)).to(torch.uint8)
    model.data_init(x)
    logp = model.log_prob(x)
    assert logp.shape == (4,) and torch.isfinite(logp).all()
    (-logp.mean()).backward()
    assert all(p.grad is not None for p in model.transforms[0].parameters())


def test_unknown_dequantization_and_odd_width_are_refused():
    with pytest.raises(ValueError, match="even image width"):
        build_model({"name": "argmax", **argmax.DEFAULTS, **TINY, "levels": 1}, (1, 4, 5), 1, TINY_DEQ)
    with pytest.raises(ValueError, match="unknown dequantizer.kind"):
        build_dequantizer({"kind": "argmaxx"}, (3, 4, 4), 8)


CONFIGS = ["argmax_cifar10.yaml", "argmax_small.yaml", "argmax_fashion_mnist.yaml", "argmax_cifar10_4levels_small.yaml"]


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_build(config):
    cfg = load_config(os.path.join(ROOT, "experiments", config))
    shape = (1, 28, 28) if cfg["data"]["name"] == "fashion_mnist" else (3, 32, 32)
    with torch.device("meta"):
        model = build_model(cfg["model"], shape, cfg["data"]["n_bits"], cfg["dequantizer"])
    code = model.transforms[0].encoding  # (the paper configs' parameter counts: tests/test_contract.py)
    assert code.num_classes == 2 ** cfg["data"]["n_bits"] and model.num_dims == math.prod(shape)


# ---- CLI on the CIFAR-10 subset at 4 colour levels (categorical, K = 4) -------------------------------------

def test_training_the_categorical_config_lowers_test_bpd(tmp_path):
    out = tmp_path / "run"
    run_command([sys.executable, "train.py", "experiments/argmax_cifar10_4levels_small.yaml", "--out", str(out),
                 f"data.path={SUBSET}", "data.max_train=256", "data.max_test=32", "model.steps=1",
                 "model.hidden_channels=16", "dequantizer.hidden_channels=8", "train.batch_size=16", "train.init_batch_size=32",
                 "train.steps=25", "train.eval_every=25", "train.sample_every=0", "train.checkpoint_every=0",
                 "train.log_every=5", "train.warmup_steps=0", "eval.batch_size=32", "sample.n=4",
                 "sample.temperatures=[0.7]"])
    test_bpd = read_metric(out, "test/bpd")
    assert set(test_bpd) == {0, 25}
    assert test_bpd[25] < test_bpd[0] - 0.5 and test_bpd[25] < 3.0, test_bpd


# ---- the dequantizer comparison's per-run overrides -------------------------------------------------------

def test_equal_budget_per_run_overrides():
    import importlib.util
    spec = importlib.util.spec_from_file_location("equal_budget", os.path.join(ROOT, "benchmarks", "equal_budget.py"))
    equal_budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(equal_budget)
    assert equal_budget.parse_run("experiments/glow_small.yaml") == ("glow_small", "experiments/glow_small.yaml", [])
    assert equal_budget.parse_run("a/flowpp_small.yaml::dequantizer.kind=argmax::train.lr=2e-3") == (
        "flowpp_small_argmax_2e-3", "a/flowpp_small.yaml", ["dequantizer.kind=argmax", "train.lr=2e-3"])
    with pytest.raises(SystemExit):
        equal_budget.parse_run("x.yaml::oops")
