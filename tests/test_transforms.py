"""Layer tests for models/transforms and the Glow conditioner nets.

Every bijection: inverse(forward(x)) == x and ldj == log|det| of the autograd
Jacobian (float64, small inputs).  Surjections (Split, UniformDequantization) get
checks of their own likelihood terms; Squeeze, ActNorm init, EdgePaddedConv2d and
ZeroConv2d get behavioural checks.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.nets.glow_nets import EdgePaddedConv2d, GlowCouplingNet, ZeroConv2d
from models.transforms.bijections.actnorm import ActNorm
from models.transforms.bijections.conv1x1 import InvertibleConv1x1, InvertibleConv1x1LU
from models.transforms.bijections.coupling import AdditiveCoupling, AffineCoupling
from models.transforms.bijections.elementwise import Logit, ScaleShift
from models.transforms.bijections.permutation import ChannelPermutation
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.split import Split
from models.transforms.surjections.uniform_dequantization import UniformDequantization
from tests.helpers import (
    assert_invertible,
    assert_ldj_matches_jacobian,
    autograd_logdet,
    perturb_parameters,
)

SHAPE = (2, 4, 4, 4)  # (B, C, H, W): per-example Jacobians are 64 x 64


# ---- layer factories (called inside the test, i.e. under the float64 fixture) -----------

def _actnorm():
    layer = ActNorm(4)
    # data-dependent init on a batch other than the test batch, with non-trivial
    # statistics, so that bias and log-scale end up far from 0
    layer(3.0 + 2.0 * torch.randn(8, 4, 4, 4))
    return layer


def _coupling(cls, split_channels=2, channels=4):
    c_b = channels - split_channels
    out = 2 * c_b if cls is AffineCoupling else c_b
    net = GlowCouplingNet(split_channels, out, hidden_channels=8)
    # the net's last layer is zero-initialised (identity coupling); move it off zero
    perturb_parameters(net[-1], std=0.2)
    return cls(net, split_channels)


def _shuffle():
    return ChannelPermutation.shuffle(4, generator=torch.Generator().manual_seed(3))


def _unit_interval(shape):
    return 0.01 + 0.98 * torch.rand(shape)


BIJECTIONS = {
    "ActNorm": (_actnorm, torch.randn),
    "InvertibleConv1x1": (lambda: InvertibleConv1x1(4), torch.randn),
    "InvertibleConv1x1LU": (lambda: InvertibleConv1x1LU(4), torch.randn),
    "ChannelPermutation.reverse": (lambda: ChannelPermutation.reverse(4), torch.randn),
    "ChannelPermutation.shuffle": (_shuffle, torch.randn),
    "Squeeze": (Squeeze, torch.randn),
    "AffineCoupling": (lambda: _coupling(AffineCoupling), torch.randn),
    "AffineCoupling-uneven": (lambda: _coupling(AffineCoupling, split_channels=1), torch.randn),
    "AdditiveCoupling": (lambda: _coupling(AdditiveCoupling), torch.randn),
    "ScaleShift": (lambda: ScaleShift(2.5, -0.3), torch.randn),
    "ScaleShift-negative": (lambda: ScaleShift(-0.5, 1.0), torch.randn),
    "Logit": (lambda: Logit(0.05), _unit_interval),
    "Logit-alpha0": (lambda: Logit(0.0), _unit_interval),
}


def _build(name):
    factory, sample = BIJECTIONS[name]
    layer = factory().double()  # .double(): some layers build float32 weights explicitly
    return layer, sample(SHAPE).double()


# ---- the two standard checks, for every bijection -------------------------------------------

@pytest.mark.parametrize("name", list(BIJECTIONS))
def test_bijection_is_invertible(name, float64):
    layer, x = _build(name)
    assert layer.bijective and not layer.factors_out
    assert_invertible(layer, x, atol=1e-10)


@pytest.mark.parametrize("name", list(BIJECTIONS))
def test_bijection_ldj_matches_autograd_jacobian(name, float64):
    layer, x = _build(name)
    # float64 throughout; the margin is for ScaleShift, whose ldj is float32 (see the
    # float64 precision test below)
    assert_ldj_matches_jacobian(layer, x, atol=1e-6, rtol=1e-7)


@pytest.mark.parametrize("name", list(BIJECTIONS))
def test_bijection_is_not_the_identity(name, float64):
    """Guards the two checks above against a trivially passing layer."""
    layer, x = _build(name)
    z, _ = layer(x)
    assert z.numel() == x.numel()
    # compare flattened, so shape-changing layers (Squeeze) are covered too
    diff = (z.reshape(-1) - x.reshape(-1)).abs().max()
    assert diff > 1e-3, f"{name} acts as the identity on the test batch"


# ---- ActNorm ---------------------------------------------------------------------------

def test_actnorm_data_init_standardizes_each_channel(float64):
    layer = ActNorm(3)
    scale = torch.tensor([0.5, 2.0, 7.0]).reshape(1, 3, 1, 1)
    shift = torch.tensor([-4.0, 0.0, 10.0]).reshape(1, 3, 1, 1)
    x = shift + scale * torch.randn(16, 3, 5, 5)
    assert not bool(layer.initialized)
    z, ldj = layer(x)
    assert bool(layer.initialized)
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-5)
    # log|det| = H W sum_c log(1 / std_c) of the init batch
    expected = 25 * -torch.log(x.std(dim=(0, 2, 3), unbiased=False)).sum()
    assert torch.allclose(ldj.double(), expected.expand(16), rtol=1e-5)


def test_actnorm_initialises_once_and_survives_state_dict(float64):
    layer = ActNorm(3)
    layer(1.0 + 3.0 * torch.randn(8, 3, 4, 4))
    bias, logs = layer.bias.detach().clone(), layer.logs.detach().clone()
    layer(torch.randn(8, 3, 4, 4) * 0.1)  # a second batch must not re-initialise
    assert torch.equal(layer.bias, bias) and torch.equal(layer.logs, logs)
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    fresh(torch.randn(8, 3, 4, 4) * 0.1)  # a loaded layer is already initialised
    assert torch.equal(fresh.bias, bias) and torch.equal(fresh.logs, logs)


# ---- permutations, squeeze ---------------------------------------------------------------

def test_permutations_permute_channels(float64):
    x = torch.randn(2, 4, 3, 3)
    z, ldj = ChannelPermutation.reverse(4)(x)
    assert torch.equal(z, x.flip(1)) and torch.equal(ldj, torch.zeros(2))
    perm = _shuffle().perm
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and perm.tolist() != [0, 1, 2, 3]


def test_squeeze_shapes_and_channel_order(float64):
    sq = Squeeze()
    assert sq.output_shape((3, 4, 6)) == (12, 2, 3)
    x = torch.randn(2, 3, 4, 6)
    z, ldj = sq(x)
    assert z.shape == (2, 12, 2, 3) and torch.equal(ldj, torch.zeros(2))
    # documented order: output channel 4c + 2i + j holds input channel c at offset (i, j)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(z[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    back = sq.inverse(z)
    assert back.shape == x.shape and torch.equal(back, x)


# ---- couplings ------------------------------------------------------------------------

def test_affine_coupling_is_non_trivial_and_keeps_first_half(float64):
    layer, x = _build("AffineCoupling")
    z, ldj = layer(x)
    assert torch.equal(z[:, :2], x[:, :2])
    assert (z[:, 2:] - x[:, 2:]).abs().max() > 1e-2
    # identity-like init would give ldj = D_b log sigmoid(2) for every example
    assert (ldj.double() - 32 * F.logsigmoid(torch.tensor(2.0))).abs().min() > 1e-3
    assert (ldj[0] - ldj[1]).abs() > 1e-4  # data-dependent


def test_coupling_at_init_is_close_to_identity(float64):
    x = torch.randn(*SHAPE)
    affine = AffineCoupling(GlowCouplingNet(2, 4, hidden_channels=8), 2)
    z, ldj = affine(x)
    assert torch.allclose(z[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))
    assert torch.allclose(ldj.double(), torch.full((2,), 32 * F.logsigmoid(torch.tensor(2.0)).item()))
    additive = AdditiveCoupling(GlowCouplingNet(2, 2, hidden_channels=8), 2)
    z, ldj = additive(x)
    assert torch.equal(z, x) and torch.equal(ldj, torch.zeros(2))


# ---- Split (factor-out) -------------------------------------------------------------------

def _split(keep=2, channels=4):
    prior = ZeroConv2d(keep, 2 * (channels - keep), 3)
    perturb_parameters(prior, std=0.2)
    return Split(prior, keep)


def _hand_gaussian_log_prob(x2, h):
    mean, log_std = h[:, 0::2], h[:, 1::2]
    elem = -0.5 * math.log(2 * math.pi) - log_std - 0.5 * (x2 - mean) ** 2 * torch.exp(-2 * log_std)
    return elem.sum(dim=(1, 2, 3))


def test_split_flags_and_shapes(float64):
    split = _split()
    assert split.factors_out and not split.bijective and split.stochastic_inverse
    assert split.output_shape((4, 4, 4)) == (2, 4, 4)
    z, ldj = split(torch.randn(*SHAPE))
    assert z.shape == (2, 2, 4, 4) and ldj.shape == (2,)


def test_split_merge_reconstructs(float64):
    split = _split()
    x = torch.randn(*SHAPE)
    assert_invertible(split, x, atol=1e-10)


def test_split_ldj_is_gaussian_log_density_of_x2(float64):
    split = _split()
    x = torch.randn(*SHAPE)
    z, ldj = split(x)
    assert torch.equal(z, x[:, :2])
    expected = _hand_gaussian_log_prob(x[:, 2:], split.prior_net(x[:, :2]))
    assert torch.allclose(ldj.double(), expected, rtol=0, atol=1e-10)
    # the split-off latent is the standardised x2
    _, _, eps = split.split(x)
    h = split.prior_net(x[:, :2])
    assert torch.allclose(eps.double(), (x[:, 2:] - h[:, 0::2]) * torch.exp(-h[:, 1::2]), atol=1e-10)


def test_split_inverse_at_temperature_zero_is_the_prior_mean(float64):
    split = _split()
    x1 = torch.randn(3, 2, 4, 4)
    x = split.inverse(x1, temperature=0.0)
    assert x.shape == (3, 4, 4, 4) and torch.equal(x[:, :2], x1)
    mean = split.prior_net(x1)[:, 0::2]
    assert torch.allclose(x[:, 2:], mean, atol=1e-12)
    assert mean.abs().max() > 1e-2  # the perturbed prior has a non-zero mean
    # at temperature 1 the sample is spread around the mean
    assert (split.inverse(x1, temperature=1.0)[:, 2:] - mean).abs().max() > 1e-2


# ---- UniformDequantization -------------------------------------------------------------------

def _integer_images(num_bins, shape=(4, 3, 4, 4)):
    x = torch.randint(0, num_bins, shape).float()
    x[0] = 0.0
    x[1] = num_bins - 1.0
    return x


@pytest.mark.parametrize("n_bits", [8, 5])
def test_uniform_dequantization(n_bits):
    k = 2 ** n_bits
    layer = UniformDequantization(n_bits)
    assert not layer.bijective and layer.stochastic_forward and not layer.exact_ldj
    x = _integer_images(k)
    y, ldj = layer(x)
    assert y.shape == x.shape
    assert bool((y >= x / k).all()) and bool((y < (x + 1) / k).all())
    assert torch.allclose(ldj.double(), torch.full((4,), -48 * math.log(k), dtype=torch.float64), rtol=1e-6)
    assert torch.equal(layer.inverse(y), x)
    y2, _ = layer(x)
    assert not torch.equal(y, y2)  # fresh noise on every call
    # integer inputs given as uint8 (as the data layer stores them) behave the same
    y3, _ = layer(x.to(torch.uint8))
    assert torch.equal(layer.inverse(y3), x)


def test_uniform_dequantization_noise_near_one_stays_in_bin(monkeypatch):
    layer = UniformDequantization(8)
    x = torch.tensor([0.0, 15.0, 16.0, 100.0, 200.0, 254.0]).reshape(1, 1, 2, 3)
    u_max = 1.0 - 2.0 ** -24  # the largest float32 below 1
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(tuple(shape), u_max, **kw))
    y, _ = layer(x)
    assert bool((y < (x + 1) / 256).all()), (y * 256).tolist()
    assert torch.equal(layer.inverse(y), x)


# ---- ldj contract: shape (B,); float32 for float32 inputs, float64 kept for float64 -------------

LAYERS = list(BIJECTIONS) + ["Split", "UniformDequantization"]


def _any_layer(name):
    if name == "Split":
        return _split(), torch.randn(*SHAPE)
    if name == "UniformDequantization":
        return UniformDequantization(8), _integer_images(256)
    factory, sample = BIJECTIONS[name]
    return factory(), sample(SHAPE)


@pytest.mark.parametrize("name", LAYERS)
def test_ldj_is_float32_per_example_for_float32_inputs(name):
    layer, x = _any_layer(name)
    z, ldj = layer(x)
    assert ldj.shape == (x.shape[0],)
    assert ldj.dtype == torch.float32 and z.dtype == torch.float32


@pytest.mark.parametrize("name", LAYERS)
def test_ldj_keeps_float64_precision_for_float64_inputs(name, float64):
    """compute_dtype policy: log-dets are computed in at least float32 and float64 stays
    float64.  A layer whose log-det is identically zero may return float32 zeros."""
    layer, x = _any_layer(name)
    layer = layer.double()
    _, ldj = layer(x)
    assert ldj.shape == (x.shape[0],)
    assert ldj.dtype == torch.float64 or bool((ldj == 0).all()), ldj.dtype


# ---- elementwise ------------------------------------------------------------------------------

def test_scaleshift_and_logit_values(float64):
    x = _unit_interval((2, 1, 2, 2))
    z, ldj = ScaleShift(2.0, -1.0)(x)
    assert torch.allclose(z, 2 * x - 1) and torch.allclose(ldj.double(), torch.full((2,), 4 * math.log(2.0)))
    z, _ = Logit(0.0)(x)
    assert torch.allclose(z, torch.log(x / (1 - x)), atol=1e-10)
    with pytest.raises(ValueError):
        ScaleShift(0.0)
    with pytest.raises(ValueError):
        Logit(0.5)


# ---- conditioner nets ----------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size", [3, 5])
def test_edge_padded_conv_keeps_spatial_shape(kernel_size, float64):
    conv = EdgePaddedConv2d(3, 5, kernel_size)
    assert conv.weight.shape == (5, 4, kernel_size, kernel_size)  # one extra is-padding channel
    assert conv(torch.randn(2, 3, 6, 7)).shape == (2, 5, 6, 7)


def test_edge_padded_conv_pad_channel_marks_the_border(float64):
    conv = EdgePaddedConv2d(2, 1, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[:, 2] = 1.0  # only the is-padding channel
    out = conv(torch.randn(2, 2, 6, 6))[:, 0]
    border = torch.ones(6, 6, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert bool((out[:, border] > 0).all())
    assert torch.equal(out[:, ~border], torch.zeros_like(out[:, ~border]))
    # corners see 5 padded taps, other border pixels 3
    assert torch.allclose(out[0, 0, 0], torch.tensor(5.0)) and torch.allclose(out[0, 0, 2], torch.tensor(3.0))


def test_edge_padding_off_and_1x1_have_no_extra_channel(float64):
    assert EdgePaddedConv2d(3, 5, 1).weight.shape == (5, 3, 1, 1)
    conv = EdgePaddedConv2d(3, 5, 3, edge_padding=False)
    assert conv.weight.shape == (5, 3, 3, 3) and conv(torch.randn(1, 3, 4, 4)).shape == (1, 5, 4, 4)


def test_zero_conv_outputs_zeros_at_init(float64):
    conv = ZeroConv2d(3, 6)
    out = conv(torch.randn(2, 3, 5, 5))
    assert out.shape == (2, 6, 5, 5) and torch.equal(out, torch.zeros_like(out))
    # with a weight and a log-scale it is an ordinary scaled conv
    with torch.no_grad():
        conv.bias.fill_(1.0)
        conv.logs.fill_(math.log(2.0) / 3)
    assert torch.allclose(conv(torch.randn(1, 3, 5, 5)), torch.full((1, 6, 5, 5), 2.0))


def test_autograd_logdet_helper_on_a_known_map(float64):
    """The helper itself: ScaleShift(a) has log|det| = D log|a| exactly."""
    logdet = autograd_logdet(ScaleShift(-3.0, 0.5), torch.randn(2, 2, 2, 2))
    assert torch.allclose(logdet, torch.full((2,), 8 * math.log(3.0)))


@pytest.mark.parametrize("edge_padding", [True, False])
def test_folded_conv_actnorm_and_zero_conv_equal_the_unfolded_layers(edge_padding, float64):
    """ConvActNorm and ZeroConv2d fold their per-channel scale and shift into the convolution:
    (W * x + b) * s == (W s) * x + b s, values and every gradient, with padding or without."""
    from models.nets.glow_nets import ConvActNorm

    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    layer = ConvActNorm(3, 5, 3, edge_padding)
    layer(x)  # data-dependent init on this batch
    zero = ZeroConv2d(3, 4, 3, edge_padding)
    with torch.no_grad():
        for p in (*layer.parameters(), *zero.parameters()):
            p.add_(0.3 * torch.randn_like(p))

    def unfolded_conv_actnorm(x):
        h = layer.conv.conv(x, layer.conv.weight, None)
        return (h + layer.norm.bias) * torch.exp(layer.norm.logs * layer.norm.logscale_factor)

    def unfolded_zero_conv(x):
        return zero.conv(x, zero.weight, zero.bias) * torch.exp(zero.logs * zero.logscale_factor)

    for module, reference in ((layer, unfolded_conv_actnorm), (zero, unfolded_zero_conv)):
        g = torch.randn(4, module(x).shape[1], 6, 6)
        params = [x, *module.parameters()]
        folded = torch.autograd.grad((module(x) * g).sum(), params)
        unfolded = torch.autograd.grad((reference(x) * g).sum(), params)
        assert torch.allclose(module(x), reference(x), atol=1e-12)
        for a, b in zip(folded, unfolded):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_edge_padded_conv_is_the_conv_of_the_padded_input_and_mask(layout, float64):
    """conv([pad(x), m]) with m = 1 on the padding: values and every gradient, either layout."""
    conv = EdgePaddedConv2d(3, 5, 3)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 6, 7).contiguous(memory_format=layout).requires_grad_()
    mask = torch.nn.functional.pad(torch.zeros(2, 1, 6, 7), (1, 1, 1, 1), value=1.0)
    expected = torch.nn.functional.conv2d(torch.cat([torch.nn.functional.pad(x, (1, 1, 1, 1)), mask], 1), conv.weight, conv.bias)
    out = conv(x)
    assert torch.allclose(out, expected, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(expected, (x, conv.weight, conv.bias), g)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want))
