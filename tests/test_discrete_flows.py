"""Discrete Flows (Tran et al. 2019, arXiv:1905.10347): mod-K bijections of one-hot categories.

Exact bijections for every K in {2, 3, 4, 5, 6, 8, 256} (non-prime K included: sigma only ever a
unit), ldj = 0, the straight-through one-hot (forward exact, backward the softmax's gradient),
probabilities that sum to 1 over the whole finite space, training below log2 K on skewed data and
never below log2 K on uniform data, valid samples, and the config errors.  The family also runs
the whole-model contract (``tests/test_contract.py``: ``discrete_flow`` and its variants).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import FlowlabError
from engine.metrics import bits_per_dim
from models.core.flow import Flow
from models.transforms.bijections import masks
from models.transforms.discrete.categorical_base import FactorizedCategorical
from models.transforms.discrete.modular_affine import (modular_affine_indices, modular_affine_inverse_indices,
                                                       modular_inverse, multiply_index, one_hot_multiply,
                                                       one_hot_shift, shift_index, units)
from models.transforms.discrete.modular_coupling import ModularCoupling, logit_channels
from models.transforms.discrete.one_hot import OneHot
from models.transforms.discrete.straight_through import straight_through_one_hot
from tests.helpers import (ROOT, assert_invertible, build_flow, meta_parameter_count, perturb_parameters,
                           resolve_overrides)

KS = [2, 3, 4, 5, 6, 8, 256]


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def one_hots(index: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(index, k).double()


def random_coupling(k: int, shape=(2, 4, 4), mask_kind: str = "checkerboard", parity: int = 0,
                    scale: bool = True, seed: int = 0) -> ModularCoupling:
    """A coupling whose conditioner is one random 3x3 conv with large weights, so that mu and sigma
    vary over the elements (a zero-initialised net would be the identity)."""
    torch.manual_seed(seed)
    c, h, w = shape
    net = nn.Conv2d(c * k, c * logit_channels(k, scale), 3, padding=1).double()
    with torch.no_grad():
        net.weight.mul_(50.0)
        net.bias.normal_(0.0, 1.0)
    return ModularCoupling(net, getattr(masks, mask_kind)(c, h, w, parity), k, tau=0.5, scale=scale)


# ---- modular arithmetic ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", KS)
def test_units_are_exactly_the_invertible_scales(k):
    expected = [s for s in range(1, k) if any(s * t % k == 1 for t in range(1, k))]
    assert units(k) == expected
    assert all(s * modular_inverse(s, k) % k == 1 for s in units(k))
    if k == 2:
        assert units(k) == [1] and logit_channels(k) == k  # only the shift acts: no sigma logits
    if k == 4:
        assert units(k) == [1, 3]
    if k == 6:
        assert units(k) == [1, 5]
    if k in (3, 5):  # prime: every non-zero scale
        assert units(k) == list(range(1, k))


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 8])
def test_one_hot_ops_are_the_modular_affine_map_exactly(k):
    """Every (x, mu, sigma): the one-hot permutations give one_hot((mu + sigma x) mod K) exactly, and
    the integer inverse gives x back."""
    us = units(k)
    grid = torch.tensor(list(itertools.product(range(k), range(k), range(len(us)))))
    x, mu, u = grid.unbind(1)
    scale = torch.tensor(us)[u]
    z = one_hot_shift(one_hot_multiply(one_hots(x, k), one_hots(u, len(us)), multiply_index(k)), one_hots(mu, k),
                      shift_index(k))
    expected = modular_affine_indices(x, mu, scale, k)
    assert torch.equal(expected, (mu + scale * x) % k)
    assert torch.equal(z, one_hots(expected, k)), "not an exact one-hot of (mu + sigma x) mod K"
    assert torch.equal(modular_affine_inverse_indices(expected, mu, scale, k), x)
    for m in range(k):  # for each (mu, sigma) the map is a permutation of the K classes
        for s in us:
            assert sorted(((m + s * torch.arange(k)) % k).tolist()) == list(range(k))


# ---- the coupling layer -------------------------------------------------------------------------

@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mask_kind,parity", [("checkerboard", 0), ("channel", 1)])
def test_coupling_is_an_exact_bijection_with_zero_ldj(k, mask_kind, parity):
    layer = random_coupling(k, mask_kind=mask_kind, parity=parity)
    g = torch.Generator().manual_seed(k)
    n = 2 if k == 256 else 6  # K = 256: the shift's (K x K) gather per element is the cost
    index = torch.randint(0, k, (n, 2, 4, 4), generator=g)
    x = one_hots(index, k)
    assert_invertible(layer, x, atol=0.0)  # bit for bit
    with torch.no_grad():
        z, ldj = layer(x)
        back = layer.inverse(z)
        mu_logits, sigma_logits = layer.logits(x)
    assert torch.equal(back, x)
    assert torch.equal(ldj, torch.zeros(n)), "a bijection of a finite set has log-det 0"
    assert torch.equal(z.sum(-1), torch.ones(z.shape[:-1], dtype=z.dtype)) and bool(((z == 0) | (z == 1)).all())
    kept = layer.mask.unsqueeze(0).expand(index.shape)
    z_index = z.argmax(-1)
    assert torch.equal(z_index[kept], index[kept]), "the kept half must pass unchanged"
    mu = mu_logits.argmax(-1)
    if sigma_logits is None:
        scale = torch.ones_like(mu)
        assert k == 2
    else:
        scale = layer.units[sigma_logits.argmax(-1)]
        assert all(math.gcd(int(s), k) == 1 for s in scale.unique()), "sigma must be a unit mod K"
        assert len(scale[~kept].unique()) > 1, "the test conditioner should pick several scales"
    assert torch.equal(z_index[~kept], ((mu + scale * index) % k)[~kept])
    assert bool((z_index[~kept] != index[~kept]).any()), "the transformed half should change"


def test_zero_initialised_conditioner_starts_as_the_identity():
    cfg = resolve_overrides(["model.name=discrete_flow", "data.n_bits=2", "model.steps=2", "model.hidden_channels=4",
                             "model.hidden_blocks=1"])
    model = build_flow(cfg, (3, 4, 4))
    x = torch.randint(0, 4, (3, 3, 4, 4), dtype=torch.uint8)
    z, _ = model.transforms(x)
    assert torch.equal(z.argmax(-1), x.long())


def test_shift_only_coupling_has_no_scale_and_inverts():
    layer = random_coupling(8, scale=False)
    assert layer.scale is False and layer.net.out_channels == 2 * 8
    x = one_hots(torch.randint(0, 8, (3, 2, 4, 4)), 8)
    assert_invertible(layer, x, atol=0.0)


# ---- the straight-through estimator -------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.1, 1.0, 3.0])
def test_straight_through_forward_is_one_hot_and_backward_is_the_softmax_gradient(tau):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    v = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    out = straight_through_one_hot(a, tau)
    assert torch.equal(out, F.one_hot(logits.argmax(-1), 7).double()), "the forward must be the exact one-hot argmax"
    (out * v).sum().backward()
    b = logits.clone().requires_grad_(True)
    (torch.softmax(b / tau, -1) * v).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-15), (a.grad - b.grad).abs().max()
    assert bool((a.grad != 0).any())
    with pytest.raises(ValueError):
        straight_through_one_hot(logits, 0.0)


def test_gradients_reach_the_conditioner_and_the_input_through_the_one_hots():
    """z is a permutation of x chosen by the straight-through one-hots of mu and sigma, written as
    bilinear forms: d z / d theta is nonzero (through softmax(theta / tau)), and d z / d x is the
    permutation itself."""
    layer = random_coupling(4)
    x = one_hots(torch.randint(0, 4, (2, 2, 4, 4)), 4).requires_grad_(True)
    w = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    z, _ = layer(x)
    (z * w).sum().backward()
    assert layer.net.weight.grad is not None and bool((layer.net.weight.grad != 0).any())
    transformed = ~layer.mask
    zi = z.detach().argmax(-1)
    # on a transformed element, d sum(z * w) / d x_j = w at the class j maps to (mu, sigma fixed)
    b, c, h, wi = 0, *[int(t[0]) for t in transformed.nonzero(as_tuple=True)]
    j = int(x.detach()[b, c, h, wi].argmax())
    assert x.grad[b, c, h, wi, j] == w[b, c, h, wi, zi[b, c, h, wi]]


# ---- whole models: exact likelihoods -------------------------------------------------------------------

def all_images(k: int, shape) -> torch.Tensor:
    d = math.prod(shape)
    return torch.tensor(list(itertools.product(range(k), repeat=d)), dtype=torch.float64).reshape(-1, *shape)


def small_flow(k: int, shape=(1, 2, 2), seed: int = 0) -> Flow:
    """OneHot -> two couplings (checkerboard, both parities) -> categorical base, all randomised."""
    layers = [OneHot(k)] + [random_coupling(k, shape, "checkerboard", p, seed=seed + p) for p in (0, 1)]
    base = FactorizedCategorical((*shape, k)).double()
    perturb_parameters(base, std=1.0, generator=torch.Generator().manual_seed(seed))
    return Flow(layers, base, shape)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_probabilities_sum_to_one_over_every_image(k):
    """Summed over all K^D images, P(x) = P_base(f(x)) is 1: f permutes the finite space, so the
    likelihood is exact (no missing or double-counted mass)."""
    model = small_flow(k)
    assert model.is_exact and model.is_discrete and model.likelihood_kind == "exact"
    x = all_images(k, (1, 2, 2))
    with torch.no_grad():
        log_p = model.log_prob(x)
        z, _ = model.transforms(x)
    assert len({tuple(v.argmax(-1).flatten().tolist()) for v in z}) == len(x), "f is not one-to-one"
    assert abs(torch.logsumexp(log_p.double(), 0).item()) < 1e-9
    # Gibbs: the uniform distribution's cross-entropy under any normalised model is >= log2 K
    assert bits_per_dim(log_p, 4).mean().item() >= math.log2(k) - 1e-9


def test_family_probabilities_sum_to_one():
    cfg = resolve_overrides(["model.name=discrete_flow", "data.n_bits=2", "model.steps=3", "model.hidden_channels=4",
                             "model.hidden_blocks=1"])
    torch.manual_seed(0)
    model = build_flow(cfg, (1, 2, 2), dtype=torch.float64)
    perturb_parameters(model, std=0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        log_p = model.log_prob(all_images(4, (1, 2, 2)))
    assert abs(torch.logsumexp(log_p.double(), 0).item()) < 1e-9


def train(model, data: torch.Tensor, steps: int, lr: float = 2e-2, batch: int = 64, seed: int = 0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        loss = bits_per_dim(model.log_prob(x), model.num_dims).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def tiny_family(n_bits: int, shape, steps: int = 2, seed: int = 0):
    cfg = resolve_overrides(["model.name=discrete_flow", f"data.n_bits={n_bits}", f"model.steps={steps}",
                             "model.hidden_channels=16", "model.hidden_blocks=1", "model.mask=channel"])
    torch.manual_seed(seed)
    return build_flow(cfg, shape)


def test_training_on_skewed_correlated_data_goes_below_log2_k_and_the_factorized_optimum():
    """K = 4, two channels: x0 ~ (0.7, 0.1, 0.1, 0.1), x1 = (x0 + 1) mod 4.  Uniform is 2 bits/dim,
    the best factorized model H(p) = 1.357 bits/dim, the true entropy H(p) / 2 = 0.678: getting
    below 1.357 needs the coupling to learn mu(x0) = -x0 mod 4 through the straight-through one-hots."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), 4 * 4 * 2048, replacement=True, generator=g)
    x0 = x0.reshape(2048, 1, 4, 4)
    data = torch.cat([x0, (x0 + 1) % 4], 1).to(torch.uint8)
    train_set, test_set = data[:1536], data[1536:]
    model = tiny_family(2, (2, 4, 4))
    with torch.no_grad():
        before = bits_per_dim(model.log_prob(test_set), model.num_dims).mean().item()
    assert abs(before - 2.0) < 1e-6, "a new model is uniform: log2 K bits/dim"
    train(model, train_set, steps=100, lr=1e-2)
    with torch.no_grad():
        after = bits_per_dim(model.log_prob(test_set), model.num_dims).mean().item()
    factorized = -sum(p * math.log2(p) for p in (0.7, 0.1, 0.1, 0.1))
    assert after < factorized - 0.1, (after, factorized)


def test_uniform_data_never_gets_below_log2_k_on_held_out_data():
    """i.i.d. uniform categories (K = 4): whatever the model learns, held-out bits/dim stay at or above
    2 (its expectation is log2 K + KL(uniform || model) >= log2 K; 2,000 held-out images of 16 dims)."""
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 4, (3000, 1, 4, 4), generator=g, dtype=torch.uint8)
    cfg = resolve_overrides(["model.name=discrete_flow", "data.n_bits=2", "model.steps=2", "model.hidden_channels=16",
                             "model.hidden_blocks=1", "model.mask=checkerboard"])
    torch.manual_seed(0)
    model = build_flow(cfg, (1, 4, 4))
    train(model, data[:1000], steps=60, lr=5e-2)
    with torch.no_grad():
        train_bpd = bits_per_dim(model.log_prob(data[:1000]), 16).mean().item()
        test_bpd = bits_per_dim(model.log_prob(data[1000:]), 16).mean().item()
    assert test_bpd >= 2.0, (train_bpd, test_bpd)


# ---- sampling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_bits", [1, 2, 3])
def test_samples_are_valid_categories(n_bits):
    model = tiny_family(n_bits, (2, 4, 4))
    perturb_parameters(model, std=0.5, generator=torch.Generator().manual_seed(0))
    model.eval()
    for t in (0.0, 0.7, 1.0):
        s = model.sample(8, temperature=t)
        assert s.shape == (8, 2, 4, 4)
        assert torch.equal(s, s.round()) and s.min() >= 0 and s.max() <= 2 ** n_bits - 1
        assert bool(torch.isfinite(model.log_prob(s)).all())
    base = model.base.sample(5)
    assert base.shape == (5, 2, 4, 4, 2 ** n_bits) and torch.equal(base.sum(-1), torch.ones(5, 2, 4, 4))
    assert torch.equal(model.sample(3, temperature=0.0), model.sample(3, temperature=0.0)), "T = 0 is the argmax"


# ---- configs and errors ----------------------------------------------------------------------------

def test_config_errors_are_one_line_flowlab_errors():
    from engine.setup import make_model
    cfg = resolve_overrides(["model.name=discrete_flow", "data.n_bits=1", "model.mask=channel"])
    with pytest.raises(FlowlabError, match="mask=channel needs at least 2 channels"):
        make_model(cfg, (1, 8, 8), 1)
    with pytest.raises(FlowlabError, match="takes no dequantizer"):
        resolve_overrides(["model.name=discrete_flow", "dequantizer.kind=uniform"])
    for bad in ("model.tau=0", "model.steps=0", "model.mask=diagonal"):
        with pytest.raises(FlowlabError):
            resolve_overrides(["model.name=discrete_flow", bad])
    with pytest.raises(FlowlabError, match="categories must be in 0..3"):
        OneHot(4)(torch.full((1, 1, 2, 2), 7, dtype=torch.uint8))


@pytest.mark.parametrize("config,n_bits,shape", [("discrete_flow_small.yaml", 2, (3, 32, 32)),
                                                 ("discrete_flow_fashion_mnist.yaml", 1, (1, 28, 28))])
def test_experiment_configs_build(config, n_bits, shape):
    from engine.config import load_config
    cfg = load_config(f"{ROOT}/experiments/{config}")
    assert cfg["model"]["name"] == "discrete_flow" and cfg["data"]["n_bits"] == n_bits
    assert 0 < meta_parameter_count(cfg, shape) < 5_000_000


def test_the_rans_codec_refuses_a_discrete_flow_with_one_clear_error():
    from compression.codec import FlowCodec

    cfg = resolve_overrides(["model.name=discrete_flow", "data.n_bits=2", "model.steps=1", "model.hidden_channels=4",
                             "model.hidden_blocks=1"])
    with pytest.raises(FlowlabError, match="discretized-logistic priors"):
        FlowCodec(build_flow(cfg, (3, 4, 4)), num_bits=2)
