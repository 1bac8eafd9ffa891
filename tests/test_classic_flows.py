"""Layer tests of the classic flows: NICE, RealNVP (masked couplings, batch norm), MADE,
MAF/IAF, fixed and learned permutations on vectors, planar, radial and Sylvester.

Every layer with an inverse: inverse(forward(x)) == x; every layer: ldj == log|det| of
the autograd Jacobian (float64, small inputs); every parameter gets a gradient.
Planar and Sylvester have no closed-form inverse (``exact_inverse = False``): they are
tested for what they promise instead -- the invertibility constraint holds for any raw
parameters (so det J > 0), and the iterative inverse recovers x.  Radial's inverse is
closed form (a quadratic in the radius).
"""
from __future__ import annotations

import pytest
import torch

from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.made import MADE
from models.nets.realnvp_nets import MLPConditioner, ResNetConditioner
from models.transforms.bijections import masks
from models.transforms.bijections.batch_norm import BatchNormBijection
from models.transforms.bijections.conv1x1 import InvertibleConv1x1, InvertibleConv1x1LU
from models.transforms.bijections.diagonal_scaling import DiagonalScaling
from models.transforms.bijections.masked_additive_coupling import MaskedAdditiveCoupling
from models.transforms.bijections.masked_affine_coupling import MaskedAffineCoupling
from models.transforms.bijections.permutation import ChannelPermutation
from models.transforms.vector.iaf import IAF
from models.transforms.vector.maf import MAF
from models.transforms.vector.planar import PlanarFlow
from models.transforms.vector.radial import RadialFlow
from models.transforms.vector.sylvester import SylvesterFlow
from tests.helpers import (
    assert_all_parameters_get_gradient,
    assert_invertible,
    assert_ldj_matches_jacobian,
    jacobian_logdet,
    perturb_parameters,
)

D = 6


def _made(ordering="natural", context=None):
    made = MADE(D, (16, 16), ordering=ordering, seed=3, context_features=context)
    with torch.no_grad():
        made.out.weight.mul_(50)  # undo the near-identity init: a non-trivial layer
        made.out.bias.normal_(0, 0.3)
    return made


def _vector_coupling(cls, parity):
    out = 2 * D if cls is MaskedAffineCoupling else D
    net = MLPConditioner(D, out, 16)
    perturb_parameters(net.net[-1], std=0.3)
    return cls(net, masks.alternating(D, parity))


def _image_coupling(mask):
    net = ResNetConditioner(3, 6, features=8, num_blocks=1).eval()
    perturb_parameters(net.out, std=0.1)
    return MaskedAffineCoupling(net, mask)


def _diag():
    layer = DiagonalScaling(D)
    with torch.no_grad():
        layer.log_scale.normal_()
    return layer


def _bn_eval(shape_features=D):
    layer = BatchNormBijection(shape_features)
    with torch.no_grad():
        layer.log_gamma.normal_(0, 0.5)
        layer.beta.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.3, 3.0)
    return layer.eval()


VECTOR_BIJECTIONS = {
    "NICE-additive-coupling": lambda: _vector_coupling(MaskedAdditiveCoupling, 0),
    "NICE-diagonal-scaling": _diag,
    "RealNVP-affine-coupling-vector": lambda: _vector_coupling(MaskedAffineCoupling, 1),
    "BatchNorm-eval-vector": _bn_eval,
    "MAF-natural": lambda: MAF(_made("natural")),
    "MAF-random-order": lambda: MAF(_made("random")),
    "IAF-reverse": lambda: IAF(_made("reverse")),
    "permutation-reverse": lambda: ChannelPermutation.reverse(D),
    "permutation-shuffle": lambda: ChannelPermutation.shuffle(D, torch.Generator().manual_seed(1)),
    "learned-LU-linear": lambda: InvertibleConv1x1LU(D).double(),
    "learned-linear": lambda: InvertibleConv1x1(D).double(),
    "radial": lambda: RadialFlow(D),
    "planar-iterative-inverse": lambda: PlanarFlow(D, init_scale=1.0),
    "sylvester-orthogonal": lambda: SylvesterFlow(D, "orthogonal", num_ortho_vecs=3),
    "sylvester-householder": lambda: SylvesterFlow(D, "householder", num_householder=3),
    "sylvester-triangular": lambda: SylvesterFlow(D, "triangular", flip=True),
}


@pytest.mark.parametrize("name", sorted(VECTOR_BIJECTIONS))
def test_vector_layer_invertible_and_ldj_exact(name, float64):
    layer = VECTOR_BIJECTIONS[name]()
    x = 1.5 * torch.randn(4, D)
    assert_invertible(layer, x, atol=1e-7)
    assert_ldj_matches_jacobian(layer, x, atol=1e-8)


@pytest.mark.parametrize("mask", ["checkerboard0", "checkerboard1", "channel0", "channel1"])
def test_image_masked_coupling_invertible_and_ldj_exact(mask, float64):
    kind, parity = mask[:-1], int(mask[-1])
    m = getattr(masks, kind)(3, 4, 4, parity) if kind == "checkerboard" else masks.channel(3, 4, 4, parity)
    layer = _image_coupling(m)
    x = torch.randn(2, 3, 4, 4)
    assert_invertible(layer, x, atol=1e-8)
    assert_ldj_matches_jacobian(layer, x, atol=1e-8)
    z, _ = layer(x)
    keep = m.bool().expand_as(x)
    assert torch.equal(z[keep], x[keep]), "the masked half must pass through unchanged"
    assert not torch.allclose(z[~keep], x[~keep]), "the other half must change"


def test_masks_partition_and_alternate():
    for make in (masks.checkerboard, masks.channel):
        a, b = make(4, 4, 4, 0), make(4, 4, 4, 1)
        assert torch.equal(a + b, torch.ones(4, 4, 4))
    assert masks.checkerboard(1, 2, 2, 0)[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert masks.channel(4, 1, 1, 0).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert masks.alternating(4, 0).tolist() == [1.0, 0.0, 1.0, 0.0]


# ---- batch norm: train and eval modes -------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, D), (8, 3, 4, 4)])
def test_batch_norm_train_mode_uses_batch_statistics(shape, float64):
    layer = BatchNormBijection(shape[1], momentum=1.0).train()
    x = 3.0 + 2.0 * torch.randn(*shape)
    z, ldj = layer(x)
    dims = [0] + list(range(2, x.dim()))
    # gamma = 1, beta = 0: the output is standardised per feature with the batch statistics
    assert torch.allclose(z.mean(dim=dims), torch.zeros(shape[1]), atol=1e-10)
    var = x.var(dim=dims, unbiased=False)
    assert torch.allclose(z.var(dim=dims, unbiased=False), var / (var + layer.eps), atol=1e-10)
    per_position = x[0, 0].numel()
    assert torch.allclose(ldj, (-0.5 * torch.log(var + layer.eps)).sum().expand(shape[0]) * per_position)
    # momentum 1: the running averages now hold the batch statistics, so eval mode gives
    # the same map and log-det, and the inverse (running averages) undoes the train-mode forward
    assert torch.allclose(layer.running_mean, x.mean(dim=dims)) and torch.allclose(layer.running_var, var)
    assert torch.allclose(layer.inverse(z), x, atol=1e-10)
    layer.eval()
    z_eval, ldj_eval = layer(x)
    assert torch.allclose(z_eval, z) and torch.allclose(ldj_eval, ldj)


def test_batch_norm_running_averages_and_eval_mode_is_per_example(float64):
    layer = BatchNormBijection(D, momentum=0.1).train()
    x = 1.0 + torch.randn(32, D)
    layer(x)
    assert torch.allclose(layer.running_mean, 0.1 * x.mean(dim=0))
    assert torch.allclose(layer.running_var, 0.9 + 0.1 * x.var(dim=0, unbiased=False))
    layer = _bn_eval()
    x = torch.randn(5, D)
    z_batch, _ = layer(x)
    z_single = torch.cat([layer(x[i: i + 1])[0] for i in range(5)])
    assert torch.allclose(z_batch, z_single), "eval mode must not mix examples"
    assert_invertible(layer, x, atol=1e-10)
    image_layer = _bn_eval(3)
    assert_ldj_matches_jacobian(image_layer, torch.randn(2, 3, 2, 2), atol=1e-8)


def test_batch_norm_gradient_flows_through_batch_statistics():
    layer = BatchNormBijection(D).train()
    x = torch.randn(16, D, requires_grad=True)
    z, ldj = layer(x)
    (z.pow(3).sum() + ldj.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.log_gamma.grad is not None and layer.beta.grad is not None


# ---- MADE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ordering", ["natural", "reverse", "random"])
def test_made_jacobian_is_strictly_triangular_in_its_ordering(ordering, float64):
    made = _made(ordering)
    order = torch.argsort(made.degrees)  # coordinates sorted by degree
    reach = torch.zeros(D, D, dtype=torch.float64)
    for x in torch.randn(8, D):
        for p in range(made.params):
            jac = torch.autograd.functional.jacobian(lambda v: made(v.reshape(1, D))[0, p], x)
            sorted_jac = jac[order][:, order]
            assert torch.equal(sorted_jac, torch.tril(sorted_jac, -1)), "output d may depend only on inputs before d"
            reach += sorted_jac.abs()
    # not trivially zero: (at some input) each output depends on its immediate predecessor in the ordering
    assert bool((torch.diagonal(reach, -1) > 0).all()), reach
    if ordering == "random":
        assert not torch.equal(made.degrees, torch.arange(1, D + 1))


def test_made_context_enters_without_breaking_autoregression(float64):
    made = _made("natural", context=3)
    x, ctx = torch.randn(1, D), torch.randn(1, 3)
    jac = torch.autograd.functional.jacobian(lambda v: made(v.reshape(1, D), ctx)[0, 0], x.reshape(D))
    assert torch.equal(jac, torch.tril(jac, -1))
    assert not torch.allclose(made(x, ctx), made(x, torch.zeros(1, 3)))


def test_maf_iaf_are_mirror_images(float64):
    """IAF's sampling map is MAF's density map with the same MADE, and vice versa."""
    made = _made("random")
    maf, iaf = MAF(made), IAF(made)
    x = torch.randn(5, D)
    z_maf, ldj_maf = maf(x)
    h = made(x)  # MAF's density: one MADE pass on x gives z and its log-det
    assert torch.allclose(z_maf, (x - h[:, 0]) * torch.exp(-h[:, 1])) and torch.allclose(ldj_maf, -h[:, 1].sum(1))
    # IAF's one-pass sampling map z -> z exp(alpha(z)) + mu(z) and MAF's D-pass inverse solve
    # the same kind of equation in opposite directions: both round trips are exact
    assert torch.allclose(iaf.forward(iaf.inverse(z_maf))[0], z_maf, atol=1e-8)
    assert torch.allclose(maf.inverse(z_maf), x, atol=1e-8)
    _, ldj_sample = iaf.sample_with_logdet(z_maf)
    _, ldj_density = iaf(iaf.inverse(z_maf))
    assert torch.allclose(ldj_sample, -ldj_density, atol=1e-8)


# ---- planar, radial, Sylvester: the invertibility constraints -------------------------------------

def test_planar_constraint_holds_for_any_raw_parameters(float64):
    layer = PlanarFlow(D)
    for _ in range(20):
        with torch.no_grad():
            layer.u.normal_(0, 1)
            layer.w.normal_(0, 2)
            # raw w.u around -3: the raw map would not be invertible
            layer.u.copy_(-3 * layer.w / layer.w.pow(2).sum() + 0.3 * layer.u)
        u_hat, w, _ = layer.params(1, dtype=torch.float64)
        assert (w * u_hat).sum().item() > -1
        x = torch.randn(64, D) * 3
        _, ldj = layer(x)
        assert torch.isfinite(ldj).all()
        det = torch.exp(jacobian_logdet(lambda v: layer(v)[0], x[:4]))
        sign = torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(
            lambda v: layer(v.reshape(1, D))[0].reshape(D), xi))[0] for xi in x[:4]])
        assert bool((sign > 0).all()) and bool((det > 0).all())
    assert PlanarFlow.exact_inverse is False and SylvesterFlow.exact_inverse is False


def test_radial_constraint_beta_at_least_minus_alpha(float64):
    layer = RadialFlow(D)
    for raw in [-20.0, -3.0, 0.0, 3.0]:
        with torch.no_grad():
            layer.a.fill_(raw)
            layer.c.fill_(-raw * 2)
        _, alpha, beta = layer.params(1, dtype=torch.float64)
        assert bool((beta >= -alpha).all()) and bool((alpha > 0).all())
        x = torch.randn(3, D)
        assert_ldj_matches_jacobian(layer, x, atol=1e-8)
        assert_invertible(layer, x, atol=1e-8)


@pytest.mark.parametrize("kind", ["orthogonal", "householder"])
def test_sylvester_orthogonality_holds_after_training_steps(kind):
    torch.manual_seed(0)
    layers = [SylvesterFlow(D, kind, num_ortho_vecs=4, num_householder=3, flip=bool(i % 2)) for i in range(3)]
    flow = Flow(layers, StandardNormal((D,)), (D,))
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    data = torch.randn(256, D) * torch.linspace(0.3, 3.0, D) + 1.0
    before = [layer.q().detach().clone() for layer in layers]
    for _ in range(30):
        loss = -flow.log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, q0 in zip(layers, before):
        q = layer.q().detach().double()
        eye = torch.eye(q.shape[1], dtype=torch.float64)
        assert (q.T @ q - eye).abs().max().item() < 1e-5, f"{kind}: Q^T Q != I after training"
        assert not torch.allclose(q.float(), q0, atol=1e-3), "training must have moved Q"
        r, rt = layer.rs()
        assert torch.equal(r, torch.triu(r)) and torch.equal(rt, torch.triu(rt))
        assert bool((torch.diagonal(r) * torch.diagonal(rt) > -1).all())
    x = data[:8].double()
    for layer in layers:
        layer.double()
        assert_invertible(layer, x, atol=1e-7)
        assert_ldj_matches_jacobian(layer, x, atol=1e-8)


def test_sylvester_triangular_q_is_a_permutation():
    q = SylvesterFlow(D, "triangular", flip=True).q()
    assert torch.equal(q @ q.T, torch.eye(D)) and torch.equal(q.abs().sum(0), torch.ones(D))


# ---- every parameter receives a gradient -----------------------------------------------------------

def _vector_flow_loss(layers, context=None):
    flow = Flow(layers, StandardNormal((D,)), (D,))
    x = torch.randn(16, D)
    return flow, -flow.log_prob(x, context).mean()


@pytest.mark.parametrize("name", sorted(VECTOR_BIJECTIONS))
def test_every_parameter_gets_a_gradient(name):
    layer = VECTOR_BIJECTIONS[name]().float()
    if isinstance(layer, BatchNormBijection):
        layer.train()
    flow, loss = _vector_flow_loss([layer, DiagonalScaling(D)])
    assert_all_parameters_get_gradient(flow, loss)


def test_amortised_layers_get_gradients_through_context():
    ctx = torch.randn(16, 5)
    for layer in (PlanarFlow(D, context_features=5), RadialFlow(D, context_features=5), MAF(_made("natural", context=5))):
        flow = Flow([layer], StandardNormal((D,)), (D,))
        loss = -flow.log_prob(torch.randn(16, D), ctx).mean()
        assert_all_parameters_get_gradient(flow, loss)


def test_made_explicit_ordering_and_bad_ordering():
    order = torch.tensor([3, 1, 2])
    made = MADE(3, (8,), ordering=order)
    assert torch.equal(made.degrees, order)
    with pytest.raises(ValueError):
        MADE(3, (8,), ordering=torch.tensor([1, 1, 2]))


# ---- the shared builder of vector layers (models/builders/vector_layers.py) --------------------------

@pytest.mark.parametrize("flow,kind", [(f, "orthogonal") for f in ("realnvp", "nice", "maf", "iaf", "planar", "radial")]
                         + [("sylvester", k) for k in ("orthogonal", "householder", "triangular")])
def test_every_layer_of_the_shared_vector_builder_is_invertible_with_exact_ldj(flow, kind, float64):
    from models.builders.vector_layers import vector_layers

    layers = vector_layers(flow, D, 3, hidden_channels=16, kind=kind, ortho_vectors=4 if kind == "orthogonal" else 0)
    assert len(layers) == 3 + (flow == "nice")
    x = 1.5 * torch.randn(4, D)
    for layer in layers:
        perturb_parameters(layer, std=0.3)  # off the near-identity initialisation (MADE outputs, zero-init MLPs)
        assert_invertible(layer, x, atol=1e-7)
        assert_ldj_matches_jacobian(layer, x, atol=1e-8)
        x = layer(x)[0].detach()


@pytest.mark.parametrize("flow", ["maf", "iaf", "planar", "radial"])
def test_amortised_layers_of_the_shared_builder_invert_given_their_context(flow, float64):
    from models.builders.vector_layers import vector_layers

    ctx = torch.randn(4, 5)
    for layer in vector_layers(flow, D, 2, hidden_channels=16, context_features=5):
        perturb_parameters(layer, std=0.3)
        assert_invertible(layer, torch.randn(4, D), atol=1e-7, context=ctx)
    with pytest.raises(ValueError, match="sylvester layers take no context"):
        vector_layers("sylvester", D, 1, context_features=5)


def test_maf_iaf_benchmark_prints_the_trade_off(capsys):
    from benchmarks import maf_iaf

    rows = maf_iaf.main(["--dims", "2", "24", "--batch", "8", "--repeats", "1", "model.hidden_channels=16"])
    out = capsys.readouterr().out
    assert "| 24 |" in out and "MAF density" in out and "MADE hidden 16x2" in out and len(rows) == 2
    # the trade-off itself, counted in MADE passes (timings on a shared CPU are too noisy to assert)
    flows = {kind: maf_iaf.build(kind, 24, 2, 16) for kind in ("maf", "iaf")}
    counts = {}
    for kind, flow in flows.items():
        calls = []
        for t in flow.transforms:
            t.made.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            flow.log_prob(torch.randn(3, 24))
            density = len(calls)
            flow.sample(3)
            counts[kind] = (density, len(calls) - density)
    assert counts == {"maf": (2, 48), "iaf": (48, 2)}, counts
