"""Whole-model tests of Glow (models/architectures/glow.py) on tiny images.

The central check recomputes log p(x) of a tiny Glow by brute force: with the
dequantization noise u fixed, y = (x + u) / 256 goes through a bijection onto all
latents (every Split's x2 and the top z); the log|det| of that map comes from the
autograd Jacobian, the priors are evaluated by hand, and the sum must equal
``model.log_prob(x)``.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from engine.config import load_config
from models.architectures import build_model, glow
from models.core.distributions import LearnedGaussian, StandardNormal
from models.nets.glow_nets import ZeroConv2d
from models.transforms.surjections.split import Split
from models.transforms.surjections.uniform_dequantization import UniformDequantization
from tests.helpers import (assert_all_parameters_get_gradient, assert_encode_decode_exact, jacobian_logdet,
                           meta_parameter_count, perturb_parameters)

ROOT = os.path.join(os.path.dirname(__file__), "..")
DATA_SHAPE = (3, 4, 4)
D = 48


def tiny_glow(perturb: bool = True, data_init: bool = True, **overrides):
    """A 2-level Glow on 3x4x4 images with 8 hidden channels.

    ``perturb``: add noise to every ZeroConv2d (coupling nets' last layers, split
    priors, learned top prior) so that no layer is the identity and no prior is N(0, I).
    ``data_init``: run ActNorm's data-dependent init on a batch of random images.
    Parameters take the current default dtype (use the ``float64`` fixture).
    """
    cfg = {"name": "glow", **glow.DEFAULTS, "levels": 2, "steps": 2, "hidden_channels": 8, **overrides}
    model = build_model(cfg, DATA_SHAPE, 8).to(torch.get_default_dtype())
    if perturb:
        perturb_parameters(model, std=0.05, types=(ZeroConv2d,))
    if data_init:
        model.data_init(random_images(16))
    return model


def random_images(n, num_bins=256):
    x = torch.randint(0, num_bins, (n, *DATA_SHAPE)).to(torch.get_default_dtype())
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, num_bins - 1.0  # both ends of the range
    return x


# ---- log_prob against a brute-force change of variables -----------------------------------------

def _latents_of_y(model, y):
    """The continuous part of the flow (everything after dequantization) as one bijection:
    y -> concat(flattened x2 of every Split, flattened top z).  Also returns the pieces."""
    z, flat, pieces = y, [], []
    for t in list(model.transforms)[1:]:
        if t.factors_out:
            x1, _, _ = t.split(z)
            x2 = z[:, x1.shape[1]:]
            assert torch.equal(x1, z[:, : x1.shape[1]])
            pieces.append((t, x1, x2))
            flat.append(x2.reshape(z.shape[0], -1))
            z = x1
        else:
            z, _ = t(z)
    flat.append(z.reshape(z.shape[0], -1))
    return torch.cat(flat, dim=1), pieces, z


def _gaussian(v, mean, log_std):
    elem = -0.5 * math.log(2 * math.pi) - log_std - 0.5 * ((v - mean) * torch.exp(-log_std)) ** 2
    return elem.reshape(v.shape[0], -1).sum(dim=1)


def brute_force_log_prob(model, x, u):
    y = (x + u) / 256
    logdet = jacobian_logdet(lambda v: _latents_of_y(model, v)[0], y)
    with torch.no_grad():
        _, pieces, top = _latents_of_y(model, y)
        priors = torch.zeros(x.shape[0], dtype=torch.float64)
        for split, x1, x2 in pieces:  # conditional Gaussian of each factored-out half
            h = split.prior_net(x1).double()
            priors += _gaussian(x2.double(), h[:, 0::2], h[:, 1::2])
        if isinstance(model.base, LearnedGaussian):
            c, hh, ww = top.shape[1:]
            h = model.base.prior_net(torch.zeros(1, 2 * c, hh, ww)).double()
            priors += _gaussian(top.double(), h[:, 0::2], h[:, 1::2])
        else:
            priors += _gaussian(top.double(), torch.zeros(()), torch.zeros(()))
    return -D * math.log(256) + logdet + priors


@pytest.mark.parametrize("overrides", [
    {},  # the paper's layer choices: affine, conv1x1, learned top
    {"coupling": "additive", "permutation": "conv1x1_lu", "learn_top": False},
], ids=["affine-conv1x1-learntop", "additive-lu-N01"])
def test_log_prob_equals_brute_force_change_of_variables(overrides, float64):
    model = tiny_glow(**overrides)
    assert isinstance(model.transforms[0], UniformDequantization)
    assert isinstance(model.base, StandardNormal if overrides.get("learn_top") is False else LearnedGaussian)
    x = random_images(2)
    # the dequantization layer is the only consumer of randomness in log_prob,
    # so re-seeding reproduces its noise u exactly
    torch.manual_seed(1234)
    log_prob = model.log_prob(x)
    torch.manual_seed(1234)
    u = torch.rand(x.shape)
    torch.manual_seed(1234)
    y, _ = model.transforms[0](x)
    assert torch.equal(y, (x + u) / 256)

    expected = brute_force_log_prob(model, x, u)
    # float64 inputs keep float64 log-dets (compute_dtype), so this is exact to rounding
    assert log_prob.dtype == torch.float64
    err = (log_prob - expected).abs()
    assert bool((err <= 1e-9).all()), (log_prob, expected, err)
    # the Jacobian term is far from zero, so the comparison is not dominated by -D log 256
    assert (expected + D * math.log(256)).abs().min() > 1.0


# ---- encode / decode, sampling ------------------------------------------------------------------------

def test_encode_gives_the_top_and_one_split_latent(float64):
    """(decode(encode(x)) == x for every family: tests/test_contract.py.)"""
    model = tiny_glow()
    eps, latents = model.encode(random_images(4))
    assert eps.shape == (4, 24, 1, 1)
    assert [tuple(l.shape) for l in latents] == [(4, 6, 2, 2)]


def test_encode_decode_round_trip_float32():
    """The production dtype: continuous round trip within float32 precision."""
    model = tiny_glow()
    x = random_images(4)
    torch.manual_seed(7)
    y, _ = model.transforms[0](x)
    torch.manual_seed(7)
    eps, latents = model.encode(x)
    # decode everything but the final floor to compare the continuous part
    z, lat = model.base.unstandardize(eps), list(latents)
    for t in reversed(list(model.transforms)[1:]):
        z = t.merge(z, lat.pop()) if t.factors_out else t.inverse(z)
    assert (z - y).abs().max() < 1e-5
    assert torch.equal(model.decode(eps, latents), x)


def test_temperature_zero_is_deterministic(float64):
    model = tiny_glow()
    a = model.sample(3, temperature=0.0)
    b = model.sample(3, temperature=0.0)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])
    # T = 0 is decoding the prior means: all standardised latents zero
    eps, latents = model.encode(random_images(3))
    assert torch.equal(model.decode(torch.zeros_like(eps), [torch.zeros_like(l) for l in latents]), a)
    # and T > 0 is not deterministic
    assert not torch.equal(model.sample(3, temperature=0.7), model.sample(3, temperature=0.7))


# ---- parameter counts (the paper config's: tests/test_contract.py) ------------------------------------

def test_additive_coupling_parameter_count():
    """Additive coupling halves the output channels of every coupling net's last layer.

    The Glow paper (arXiv:1807.03039) is quoted at 37.9M for the additive variant, but the official
    model.py builds that layer as ``conv2d_zeros(n_z // 2)`` (3x3, edge padding, bias,
    logs) and otherwise the same network, so the count is the affine one minus
    32 steps x sum over levels of (C/2) * (9 * 513 + 2), C = 12, 24, 48:
    44,603,604 - 6,207,936 = 38,395,668 (38.4M).  We assert our derivation, not 37.9M.
    """
    cfg = load_config(os.path.join(ROOT, "experiments", "glow_cifar10.yaml"), ["model.coupling=additive"])
    n = meta_parameter_count(cfg, (3, 32, 32))
    removed = 32 * sum((c // 2) * (9 * 513 + 2) for c in (12, 24, 48))
    assert removed == 6_207_936
    assert n == 44_603_604 - removed == 38_395_668


# ---- gradients (of a perturbed model, for every family: tests/test_contract.py) --------------------------

def test_one_optimizer_step_reaches_every_parameter():
    """Zero-initialised ZeroConv2d layers make some grads exactly zero at init (their logs, and
    every layer of a coupling net before its ZeroConv2d); the contract tests perturb them as a
    stand-in for training.  Here: exactly those are zero, and one real optimizer step suffices."""
    model = tiny_glow(perturb=False)
    x = random_images(8)
    model.zero_grad()
    (-model.log_prob(x).mean()).backward()
    zero_at_init = {n for n, p in model.named_parameters() if not bool((p.grad != 0).any())}
    # exactly the parameters hidden behind a zero-initialised conv
    assert zero_at_init and all(n.endswith(".logs") or ".net." in n for n in zero_at_init)
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    assert_all_parameters_get_gradient(model, -model.log_prob(x).mean())


# ---- options ---------------------------------------------------------------------------------

OPTIONS = list(itertools.product(glow.CHOICES["permutation"], glow.CHOICES["coupling"], [True, False]))


@pytest.mark.parametrize("permutation,coupling,learn_top", OPTIONS)
def test_glow_options(permutation, coupling, learn_top, float64):
    model = tiny_glow(permutation=permutation, coupling=coupling, learn_top=learn_top, steps=1)
    assert isinstance(model.base, LearnedGaussian if learn_top else StandardNormal)
    assert sum(isinstance(t, Split) for t in model.transforms) == 1
    x = random_images(4)
    log_prob = model.log_prob(x)
    assert log_prob.shape == (4,) and bool(torch.isfinite(log_prob).all())
    assert_encode_decode_exact(model, x)


def test_image_size_must_divide_by_two_to_the_levels():
    with pytest.raises(ValueError, match="not divisible"):
        build_model({"name": "glow", **glow.DEFAULTS, "levels": 3}, (3, 4, 4), 8)
