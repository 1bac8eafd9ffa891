"""Integer Discrete Flows (models/architectures/idf.py, models/transforms/discrete/).

Exactness is tested with torch.equal (no tolerance): every layer and the whole model
must map integer images, including all-0 and all-255 ones, to integer latents and back
bit for bit, also with large random network outputs in float32.  (Integer samples,
gradients of every parameter and the paper config's parameter count: tests/test_contract.py.)
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import load_config
from engine.metrics import bits_per_dim
from engine.schedule import learning_rate
from models.architectures import build_model, idf
from models.nets.densenet import DenseNet, dense_growths
from models.transforms.bijections.permutation import ChannelPermutation
from models.transforms.bijections.squeeze import Squeeze
from models.core.discretized_logistic import DiscretizedLogisticMixture
from models.transforms.discrete.factor_out import IntegerFactorOut, params_per_channel
from models.transforms.discrete.integer_coupling import IntegerAdditiveCoupling, translated_channels
from models.transforms.discrete.integer_shift import IntegerShift
from models.core.distributions import DiscretizedLogisticMixturePrior
from models.transforms.discrete.rounding import round_straight_through
from tests.helpers import ROOT, assert_all_parameters_get_gradient, meta_parameter_count, perturb_parameters

DATA_SHAPE = (3, 8, 8)


def images(n: int, shape=DATA_SHAPE) -> torch.Tensor:
    """Random uint8 images; the first is all 0, the second all 255."""
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    x[0], x[1] = 0, 255
    return x


def tiny_idf(std: float = 0.5, **overrides):
    """A 2-level IDF on 3x8x8 images whose zero-initialised last convs and top prior are
    perturbed, so couplings translate by many bins and priors are not at their initial values."""
    cfg = {"name": "idf", **idf.DEFAULTS, "levels": 2, "steps": 2, "hidden_channels": 8,
           "hidden_blocks": 2, **overrides}
    model = build_model(cfg, DATA_SHAPE, 8)
    with torch.no_grad():
        for net in [m for m in model.modules() if isinstance(m, DenseNet)]:
            perturb_parameters(net.out, std=std)  # the zero-initialised last conv; the others are random
        perturb_parameters(model.base, std=std)
    return model


def is_integer(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, torch.round(t)))


# ---- layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["quarter", "half"])
def test_integer_coupling_is_exact_with_large_translations(split):
    c = 12
    x2c = translated_channels(c, split)
    assert x2c == (3 if split == "quarter" else 6)
    coupling = IntegerAdditiveCoupling(DenseNet(c - x2c, x2c, 16, 2), c - x2c)
    with torch.no_grad():
        perturb_parameters(coupling, std=2.0)
    x = torch.randint(-128, 128, (8, c, 4, 4)).float()
    x[0], x[1] = -128.0, 127.0
    z, ldj = coupling(x)
    assert is_integer(z) and torch.equal(ldj, torch.zeros(8))
    assert torch.equal(z[:, : c - x2c], x[:, : c - x2c])
    assert (z != x).float().mean() > 0.1  # a real translation, many bins wide
    assert (z - x).abs().max() > 10
    assert torch.equal(coupling.inverse(z), x)


def test_shift_squeeze_permutation_are_exact_on_integers():
    raw = images(4)
    x = raw.float()
    shift = IntegerShift(128)
    z, _ = shift(raw)
    assert z.dtype == torch.get_default_dtype() and z.min() == -128 and z.max() == 127
    assert torch.equal(shift.inverse(z), x)
    for layer in (Squeeze(), ChannelPermutation.shuffle(3)):
        z, _ = layer(x)
        assert torch.equal(layer.inverse(z), x)


@pytest.mark.parametrize("mixtures", [1, 3])
def test_factor_out_split_merge_exact_and_scores_x2(mixtures):
    fo = IntegerFactorOut(DenseNet(6, 6 * params_per_channel(mixtures), 8, 2), 6, mixtures)
    with torch.no_grad():
        perturb_parameters(fo, std=0.5)
    x = torch.randint(-300, 300, (4, 12, 4, 4)).float()
    z, ldj, latent = fo.split(x)
    assert torch.equal(fo.merge(z, latent), x)
    expected = fo.latent_distribution(x[:, :6]).log_prob(x[:, 6:]).sum(dim=(1, 2, 3))
    assert torch.allclose(ldj, expected) and bool((ldj < 0).all())
    assert is_integer(fo.inverse(z)) and fo.inverse(z).shape == x.shape


def test_straight_through_rounding_passes_gradients_to_the_coupling_net():
    v = torch.tensor([0.2, 0.7, -1.4], requires_grad=True)
    out = round_straight_through(v)
    assert torch.equal(out, torch.tensor([0.0, 1.0, -1.0]))
    out.sum().backward()
    assert torch.equal(v.grad, torch.ones(3))

    coupling = IntegerAdditiveCoupling(DenseNet(9, 3, 8, 2), 9)
    with torch.no_grad():
        perturb_parameters(coupling, std=0.5)
    z, _ = coupling(torch.randint(-128, 128, (4, 12, 4, 4)).float())
    assert_all_parameters_get_gradient(coupling, (z[:, 9:] ** 2).mean())


# ---- the discretized logistic mixture -----------------------------------------------------------

def _mixtures():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 3, generator=g, dtype=torch.float64) * 20
    log_scales = torch.tensor([-3.0, 0.0, 1.5, 3.0], dtype=torch.float64).unsqueeze(1).expand(4, 3).clone()
    return DiscretizedLogisticMixture(means, log_scales, torch.randn(4, 3, generator=g, dtype=torch.float64))


def test_discretized_logistic_mixture_sums_to_one_over_the_integers():
    mix = _mixtures()
    ks = torch.arange(-3000, 3001, dtype=torch.float64)
    log_p = mix.log_prob(ks.unsqueeze(1).expand(-1, 4))  # (K, 4)
    total = torch.exp(log_p).sum(dim=0)
    assert torch.allclose(total, torch.ones(4, dtype=torch.float64), atol=1e-12), total
    single = DiscretizedLogisticMixture(torch.tensor([[0.3]]), torch.tensor([[-6.0]]))
    assert abs(single.log_prob(torch.tensor([0.0])).item()) < 1e-6  # tiny scale: all mass on round(mu)


def test_interval_probs_fold_the_tails_into_the_edges():
    mix = _mixtures()
    probs = mix.interval_probs(-40, 40)  # (4, 81)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-12)
    inside = torch.exp(mix.log_prob(torch.arange(-39, 40, dtype=torch.float64).unsqueeze(1).expand(-1, 4))).T
    assert torch.allclose(probs[:, 1:-1], inside, rtol=1e-9, atol=1e-15)
    edges = torch.exp(mix.log_prob(torch.tensor([[-40.0] * 4, [40.0] * 4], dtype=torch.float64))).T
    assert bool((probs[:, [0, -1]] >= edges - 1e-15).all())  # CDF differences: absolute error ~1e-16


# ---- the whole model --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"coupling_split": "half", "split_prior_mixtures": 3, "permutation": "reverse"}],
                         ids=["official-layers", "half-mixture-split"])
def test_model_encode_decode_is_exact_on_images_with_0_and_255(overrides):
    model = tiny_idf(**overrides)
    x = images(6)
    top, latents = model.encode(x)
    assert len(latents) == 1 and all(is_integer(t) for t in [top, *latents])
    assert (top.abs().max() > 127) or any(l.abs().max() > 127 for l in latents)  # latents leave the pixel range
    assert torch.equal(model.decode(top, latents), x.float())
    # inverse of each layer in turn, as sampling does
    z = x
    for t in model.transforms:
        z, _ = t.split(z)[0::2] if t.factors_out else t(z)
        assert is_integer(z)


def test_log_prob_is_the_sum_of_the_discrete_priors_on_the_latents(float64):
    model = tiny_idf()
    x = images(3)
    top, latents = model.encode(x)
    expected = model.base.log_prob(top)
    z = x
    for t in model.transforms:  # recompute each split prior from the kept half
        if t.factors_out:
            x1 = z[:, : t.keep_channels]
            expected = expected + t.latent_distribution(x1).log_prob(z[:, t.keep_channels:]).sum(dim=(1, 2, 3))
            z = x1
        else:
            z, _ = t(z)
    log_prob = model.log_prob(x)
    assert torch.allclose(log_prob, expected, rtol=1e-12, atol=0)
    bpd = bits_per_dim(log_prob, model.num_dims)
    assert torch.allclose(bpd.double(), -log_prob / (math.prod(DATA_SHAPE) * math.log(2)), rtol=1e-6)


def test_training_lowers_bpd():
    model = tiny_idf(std=0.05)
    x = images(16)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = bits_per_dim(model.log_prob(x), model.num_dims).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3, (first, loss.item())


def test_prior_initialisation_matches_the_official_code():
    prior = DiscretizedLogisticMixturePrior((2, 1, 1), 5, 256.0)
    d = prior.distribution(1)
    assert torch.equal(d.means[0, 0, 0, 0], torch.tensor([-512.0, -256.0, 0.0, 256.0, 512.0]))
    assert torch.allclose(d.log_scales, torch.full_like(d.log_scales, math.log(256)))
    assert dense_growths(512, 12) == [42] * 4 + [43] * 8 and sum(dense_growths(48, 5)) == 48


# ---- configs and schedule ---------------------------------------------------------------------------

def test_paper_config_trains_as_the_official_code_and_the_small_one_is_small():
    """(The paper config's parameter count, 58,458,052: tests/test_contract.py.)"""
    cfg = load_config(f"{ROOT}/experiments/idf_cifar10.yaml")
    assert cfg["train"]["optimizer"] == "adamax" and cfg["train"]["eps"] == 1e-7 and cfg["train"]["batch_size"] == 256
    assert meta_parameter_count(load_config(f"{ROOT}/experiments/idf_small.yaml"), (3, 32, 32)) < 1_000_000


def test_exponential_schedule_decays_per_epoch_from_the_first_step():
    lr = [learning_rate(s, 1e-3, 1560, 10**6, "exponential", 0.999, 156) for s in (0, 155, 156, 1559, 1560, 15600)]
    assert lr[0] == pytest.approx(1e-3 / 1560)
    assert lr[2] == pytest.approx(1e-3 * 157 / 1560 * 0.999)
    assert lr[4] == pytest.approx(1e-3 * 0.999 ** 10) and lr[5] == pytest.approx(1e-3 * 0.999 ** 100)
