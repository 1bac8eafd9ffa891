"""Bayesian layers and the bnn objective (issue 16, item 2): mean-field Gaussian VI with local
reparameterization, Multiplicative Normalizing Flows (flow q(z), auxiliary r(z | W), the KL bound),
the classifier family and its objective (negative ELBO, ECE), on tiny generated labelled data."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import FlowlabError
from data.datasets import ImageDataset
from engine.config import resolve
from engine.objectives import OBJECTIVES, build_objective
from engine.objective_bnn import (LabelledBatch, classification_scores, expected_calibration_error,
                                  predictive_entropy)
from models.architectures import build_model
from models.bayes.gaussian import diag_log_prob
from models.bayes.mean_field import MeanFieldLayer
from models.bayes.mnf import MNFLayer
from models.bayes.noise_flow import NoisePosterior, ReverseModel
from tests.helpers import assert_invertible, assert_ldj_matches_jacobian, perturb_parameters, read_metric


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def _perturbed(module, seed=0, std=0.3):
    perturb_parameters(module, std=std, generator=torch.Generator().manual_seed(seed))
    return module


# ---- the flows on z ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q", "r"])
def test_the_flows_on_z_are_invertible_with_exact_log_dets(which, float64):
    torch.manual_seed(0)
    model = NoisePosterior(5, steps=3, hidden_channels=8) if which == "q" else ReverseModel(5, 3, 8)
    flow = _perturbed(model.flow)
    z = torch.randn(6, 5, dtype=torch.float64)
    assert_invertible(flow, z, atol=1e-10)
    assert_ldj_matches_jacobian(flow, z, atol=1e-9)


def test_q_z_is_a_normalised_density_and_sample_reports_it(float64):
    """1-D q(z): its log-density from the couplings' inverses integrates to 1 on a grid, and
    ``sample`` returns the same log q(z) as ``log_prob`` at its own samples."""
    torch.manual_seed(1)
    q = NoisePosterior(1, steps=2, hidden_channels=8, init_log_var=math.log(0.3))
    _perturbed(q.flow, seed=1, std=0.5)
    grid = torch.linspace(-6, 8, 20001, dtype=torch.float64)[:, None]
    mass = torch.trapezoid(torch.exp(q.log_prob(grid)), grid[:, 0]).item()
    assert abs(mass - 1) < 1e-4, mass
    z, log_q = q.sample(64)
    assert torch.allclose(log_q, q.log_prob(z), atol=1e-9)


# ---- local reparameterization ------------------------------------------------------------------

def _explicit_outputs(layer, x, n, gen_seed=0):
    """Outputs for one input x (1, ...) under n explicitly drawn weights W ~ q(W) (W, z drawn here)."""
    torch.manual_seed(gen_seed)
    lay = layer.layout
    sigma = torch.sqrt(layer.weight_var)
    if isinstance(layer, MNFLayer):
        z, _ = layer.noise.sample(n)
    else:
        z = torch.ones(n, lay.noise_dim, dtype=x.dtype)
    outs = []
    for zi in z:
        w = lay.noise_view(zi) * layer.weight_mean + sigma * torch.randn_like(sigma)
        outs.append(lay.apply(x, w, layer.bias))
    return torch.cat(outs).flatten(1)


@pytest.mark.parametrize("cls", [MeanFieldLayer, MNFLayer])
@pytest.mark.parametrize("kernel", [None, 2])
@torch.no_grad()
def test_local_reparameterization_matches_sampling_the_weights(cls, kernel, float64):
    """The output distribution of the layer's forward (one draw per example, no W drawn) has the
    mean and variance of the outputs under explicitly sampled W ~ q(W) (8000 draws each, fixed seed:
    means within 5 standard errors, variances within 8%)."""
    torch.manual_seed(2)
    kw = {"steps": 1, "reverse_steps": 1, "flow_hidden_channels": 8} if cls is MNFLayer else {}
    layer = cls(3, 2, kernel, init_log_var=math.log(0.05), **kw).double()
    if cls is MNFLayer:
        layer.noise.base_log_var.fill_(math.log(0.1))
        _perturbed(layer.noise.flow, seed=2, std=0.3)
    x = torch.randn(1, 3, 3, 3, dtype=torch.float64) if kernel else torch.randn(1, 3, dtype=torch.float64)
    n = 8000
    torch.manual_seed(3)
    local = layer(x.expand(n, *x.shape[1:])).flatten(1)
    explicit = _explicit_outputs(layer, x, n)
    se = torch.sqrt(explicit.var(0) / n + local.var(0) / n)
    assert bool(((local.mean(0) - explicit.mean(0)).abs() <= 5 * se).all()), (local.mean(0), explicit.mean(0))
    ratio = local.var(0) / explicit.var(0)
    assert bool(((ratio - 1).abs() < 0.08).all()), ratio


# ---- the MNF KL bound ---------------------------------------------------------------------------

def _mnf(in_f, out_f, kernel, seed, flows=1):
    torch.manual_seed(seed)
    layer = MNFLayer(in_f, out_f, kernel, init_log_var=math.log(0.05), steps=flows, reverse_steps=flows,
                     flow_hidden_channels=8).double()
    with torch.no_grad():
        layer.noise.base_log_var.fill_(math.log(0.1))
    _perturbed(layer.noise.flow, seed=seed)
    _perturbed(layer.reverse.flow, seed=seed + 1)
    return layer


@pytest.mark.parametrize("kernel", [None, 2])
@torch.no_grad()
def test_mnf_kl_estimate_is_unbiased_for_its_definition(kernel, float64):
    """E[kl()] equals E_{z ~ q(z), W ~ q(W|z)}[KL(q(W|z) || p) + log q(z) - log r(z | W)] computed
    here with W drawn explicitly, the conditional KL summed entry by entry and c^T W formed from W (no
    local reparameterization, no closed-form shortcut): 20000 independent single-sample estimates
    (``kl_terms``; ``kl()`` is their mean) against 20000 explicit draws, within 4 standard errors."""
    layer = _mnf(3, 2, kernel, seed=4)
    lay, n = layer.layout, 20000
    torch.manual_seed(5)
    t = layer.kl_terms(n)
    estimates = t["conditional"] + t["log_q"] - t["log_r"]
    torch.manual_seed(6)
    z, log_q = layer.noise.sample(n)
    mu, var = lay.noise_major(layer.weight_mean), lay.noise_major(layer.weight_var)   # (noise_dim, rest)
    mean = z[:, :, None] * mu
    w = mean + var.sqrt() * torch.randn_like(mean)                                   # W ~ q(W | z), (n, d, rest)
    a = torch.einsum("d,ndr->nr", layer.reverse.c, w)                                 # c^T W
    a = torch.tanh(a) if kernel is None else a
    conditional = 0.5 * (var / layer.prior_var + mean ** 2 / layer.prior_var - 1 - torch.log(var / layer.prior_var))
    explicit = conditional.sum((1, 2)) + log_q - layer.reverse.log_prob(z, a.mean(1))
    se = math.sqrt(estimates.var() / n + explicit.var() / n)
    assert abs(estimates.mean() - explicit.mean()) <= 4 * se, (estimates.mean(), explicit.mean(), se)
    assert estimates.std() > 0  # a genuine estimator: the draws differ
    torch.manual_seed(7)
    one = layer.kl()
    torch.manual_seed(7)
    t = layer.kl_terms(1)
    assert torch.allclose(one, (t["conditional"] + t["log_q"] - t["log_r"])[0])


@torch.no_grad()
def test_mnf_bound_is_the_mean_field_kl_with_identity_flow_r_equal_to_q_and_fixed_z(float64, monkeypatch):
    """No flow steps, r(z | W) := q(z) and q(z_0) a point mass at m (variance e^-40): the bound is
    KL(q(W | z = m) || p(W)), the mean-field KL of (m * mu, sigma); m = 1 gives the mean-field layer's."""
    torch.manual_seed(6)
    for m in (1.0, 0.5):
        layer = MNFLayer(4, 3, None, steps=0, reverse_steps=0, init_log_var=math.log(0.2)).double()
        layer.noise.base_mean.fill_(m)
        layer.noise.base_log_var.fill_(-40.0)
        monkeypatch.setattr(layer.reverse, "log_prob", lambda z, mean_a: layer.noise.log_prob(z))
        mf = MeanFieldLayer(4, 3, None, init_log_var=0.0).double()
        mf.weight_mean.copy_(m * layer.weight_mean)
        mf.weight_rho.copy_(layer.weight_rho)
        assert torch.allclose(layer.kl(), mf.kl(), rtol=1e-9, atol=1e-9), (m, layer.kl(), mf.kl())


@torch.no_grad()
def test_mnf_kl_bound_lies_above_the_exact_kl(float64):
    """A 1x1 dense layer: q(w) = E_z N(w; z mu, sigma^2) is one-dimensional, so KL(q(w) || p(w)) is a
    quadrature (q(w) on a grid, averaged over 20000 z draws).  The bound's mean over 20000 estimates
    lies above it (Louizos & Welling eq. 13), by E_W KL(q(z|W) || r(z|W)) >= 0."""
    torch.manual_seed(7)
    layer = MNFLayer(1, 1, None, steps=1, reverse_steps=1, flow_hidden_channels=8, init_log_var=math.log(0.04)).double()
    layer.weight_mean.fill_(0.8)
    layer.noise.base_log_var.fill_(math.log(0.25))
    _perturbed(layer.noise.flow, seed=7)
    _perturbed(layer.reverse.flow, seed=8)
    grid = torch.linspace(-4, 5, 2001, dtype=torch.float64)
    z, _ = layer.noise.sample(20000)
    sigma = math.sqrt(layer.weight_var.item())
    q = torch.zeros_like(grid)
    for chunk in z[:, 0].split(5000):
        q += torch.exp(-0.5 * ((grid[:, None] - chunk * 0.8) / sigma) ** 2).sum(1) / (sigma * math.sqrt(2 * math.pi))
    q /= z.shape[0]
    log_p = -0.5 * math.log(2 * math.pi) - 0.5 * grid ** 2
    exact = torch.trapezoid(q * (torch.log(q.clamp_min(1e-300)) - log_p), grid).item()
    t = layer.kl_terms(20000)
    draws = t["conditional"] + t["log_q"] - t["log_r"]
    bound, se = draws.mean().item(), draws.std().item() / math.sqrt(20000)
    assert torch.trapezoid(q, grid).item() == pytest.approx(1, abs=1e-6)
    assert bound >= exact - 3 * se, (bound, exact, se)


# ---- calibration and entropy ------------------------------------------------------------------

def test_expected_calibration_error_on_a_hand_example():
    """Confidences 0.9, 0.8, 0.6, 0.7 with correct = 1, 0, 1, 1: with 15 bins each falls in its own
    bin, ECE = (0.1 + 0.8 + 0.4 + 0.3) / 4 = 0.4; with 2 bins all lie in (0.5, 1]: accuracy 0.75 =
    mean confidence 0.75, ECE = 0."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.4, abs=1e-12)
    assert expected_calibration_error(probs, labels, 2) == pytest.approx(0.0, abs=1e-12)
    scores = classification_scores(probs, labels, 15)
    assert scores["error"] == 0.25
    assert scores["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.7)) / 4)
    h = predictive_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(h, torch.tensor([math.log(2), 0.0], dtype=torch.float64))


# ---- the family, the objective and the trainer ---------------------------------------------------

def _tiny_labelled(n_train=96, n_test=48, classes=4, seed=0, labels=True) -> ImageDataset:
    """16x16 RGB images whose class k lights quadrant k, plus noise: a task a LeNet learns in steps."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randint(0, 80, (n, 3, 16, 16), generator=g)
        for k in range(classes):
            r, c = divmod(k, 2)
            x[y == k, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 150
        return x.clamp(0, 255).to(torch.uint8), y

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    data = ImageDataset(xtr, xte, 8, "tiny_quadrants", "generated quadrant images")
    if labels:
        data.train_labels, data.test_labels = ytr, yte
    return data


TINY_MODEL = ["model.name=bnn", "model.hidden_channels=[4,8]", "model.fc_hidden_channels=16", "model.num_classes=4",
              "model.steps=1", "model.reverse_steps=1", "model.flow_hidden_channels=8"]


def _config(kind, extra=()):
    from engine.config import apply_overrides
    return resolve(apply_overrides({}, [*TINY_MODEL, f"model.kind={kind}", "objective.name=bnn", "objective.samples=2",
                                        "objective.train_size=5000", "train.steps=30", "train.batch_size=32",
                                        "train.lr=0.01", "train.log_every=1", "train.eval_every=30",
                                        "train.sample_every=30", "train.checkpoint_every=30", *extra]))


@pytest.mark.parametrize("kind", ["deterministic", "mean_field", "mnf"])
def test_each_kind_trains_on_the_shared_trainer_and_its_loss_drops(kind, tmp_path):
    """30 steps of the trainer (labelled batches, micro-batches of 16) on generated quadrant images:
    the negative ELBO and the NLL of the last 5 steps lie below those of the first 5, and the test
    error is below 1/2 (chance: 3/4); the test numbers and the predictions file are written."""
    from engine.trainer import Trainer

    torch.manual_seed(0)
    data = _tiny_labelled()
    cfg = _config(kind, ["train.grad_accum_steps=2"])
    trainer = Trainer(cfg, str(tmp_path), data=data, tensorboard=False)
    trainer.fit()
    for name in ("train/nelbo", "train/nll"):
        values = list(read_metric(tmp_path, name).values())
        assert len(values) == 30
        assert sum(values[-5:]) < sum(values[:5]), (name, values)
    error = read_metric(tmp_path, "test/error")
    assert set(read_metric(tmp_path, "test/ece")) == set(error) == {0, 30}
    assert error[30] < 0.5, error
    assert (tmp_path / "samples" / "step_0000030.json").exists()


def test_the_kl_term_is_the_models_and_the_loss_scales_it_by_n():
    torch.manual_seed(1)
    cfg = _config("mean_field")
    model = build_model(cfg["model"], (3, 16, 16), 8, cfg["dequantizer"])
    data = _tiny_labelled()
    objective = build_objective({**cfg["objective"], "train_size": 0})
    objective.check(data, model)
    assert objective.n_train == 96
    batch = LabelledBatch(data.train[:8], data.train_labels[:8])
    torch.manual_seed(2)
    loss, logs = objective(model, batch)
    torch.manual_seed(2)
    nll = F.cross_entropy(model(batch.images), batch.labels)
    assert torch.allclose(loss, nll + model.kl() / 96)
    assert torch.allclose(logs["kl"], model.kl())
    assert [len(b) for b in batch.split(3)] == [3, 3, 2]


def test_the_objective_rejects_unlabelled_data_and_wrong_models_with_one_line():
    cfg = _config("mnf")
    model = build_model(cfg["model"], (3, 16, 16), 8, cfg["dequantizer"])
    objective = OBJECTIVES["bnn"]()
    with pytest.raises(FlowlabError, match="carries no labels") as e:
        objective.check(_tiny_labelled(labels=False), model)
    assert "\n" not in str(e.value) and "tiny_quadrants" in str(e.value)
    data = _tiny_labelled()
    data.train_labels = data.train_labels + 4
    with pytest.raises(FlowlabError, match="model.num_classes=8"):
        objective.check(data, model)
    vae = build_model(resolve({"model": {"name": "flow_vae"}})["model"], (1, 8, 8), 1, {"kind": "none"})
    with pytest.raises(FlowlabError, match="needs|trains a Bayesian classifier"):
        objective.check(ImageDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), 1, "x", "x"), vae)
    with pytest.raises(FlowlabError, match="labelled batches"):
        objective(model, data.train[:4])


@pytest.mark.parametrize("override, message", [
    ("model.kind=bayes", "'model.kind' must be one of"), ("model.hidden_channels=[4]", "a list of 2"),
    ("model.prior_var=0", "'model.prior_var' must be in (0"), ("objective.samples=0", "'objective.samples' must be >= 1"),
    ("objective.ece_bins=0", "'objective.ece_bins' must be >= 1"),
])
def test_bad_keys_are_one_line_errors(override, message):
    from engine.config import apply_overrides
    with pytest.raises(FlowlabError) as e:
        resolve(apply_overrides({}, ["model.name=bnn", "objective.name=bnn", override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_images_too_small_for_lenet_are_a_clear_error():
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model(resolve({"model": {"name": "bnn"}})["model"], (1, 12, 12), 8, {"kind": "none"})


def test_gaussian_log_prob_matches_torch():
    x, m, lv = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    ref = torch.distributions.Normal(m, torch.exp(0.5 * lv)).log_prob(x).sum(-1)
    assert torch.allclose(diag_log_prob(x, m, lv), ref, atol=1e-5)
