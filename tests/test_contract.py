"""The whole-model contract, as one spec every registered family is held to.

Every architecture in ``models.architectures.ARCHITECTURES`` is built tiny (``TINY``, dotted
overrides resolved like users' configs), its zero-initialised parameters moved off zero (a
stand-in for a few training steps, so no layer is the identity and every parameter can get a
gradient), and its data-dependent init done (``model.data_init(x)``) on the data it takes.  What
a family takes is stated once, in ``DATA_KIND`` (``case_data`` / ``Data``: inputs, shape, bits,
objective): "image" (integer images in [0, 2^bits - 1] of 3x8x8, objective bpd), "vector"
(continuous (D,) vectors, D = 2 as the toys, objective nll: ``vector_flow``) or "binary"
(1-bit 1x8x8 images, objective elbo: ``flow_vae``, a VAE, not a Flow) or "labelled" (3x16x16 images
with class labels, objective bnn: ``bnn``, a Bayesian classifier, not a Flow).  Then, on the
``--device`` the suite runs on (``tests/conftest.py``):

* Flows: ``log_prob(x)`` is float32 of shape (B,) and finite; ``model(x, return_aux=True)`` gives
  the same numbers (same seed) and a dict of scalar auxiliary losses.  The VAE: ``elbo(x)`` is
  float32 (B,), finite, the sum of the two terms its forward returns (it has no ``return_aux``);
* the loss of the family's own objective (``engine.objectives``: bpd / nll / elbo, called as the
  trainer calls it; for images equal to the trainer's bits/dim plus auxiliary losses) reaches
  every parameter;
* ``sample(n)``: images: n distinct, finite, integer images of the data shape in [0, 2^bits - 1];
  vectors: n distinct finite (n, D) vectors of finite density; the VAE: binary images (and
  Bernoulli means in [0, 1]);
* ``decode(*encode(x))`` gives back x: images bit for bit, vectors to 1e-10 (closed-form
  inverses) or 1e-8 (planar / Sylvester bisection), all in float64 with tight tolerances;
* the likelihood the model reports (``likelihood_kind``, estimated log-dets, ``is_discrete``)
  is the one stated per family in ``LIKELIHOOD``; the VAE's "bound": its importance-sampled
  log p(x) lies above its ELBO on average;
* in eval mode a seed reproduces ``log_prob`` (the VAE: ELBO) exactly (a second build from the
  same seed too), and without re-seeding it is the same number again exactly when the family is exact;
* every tensor a model makes while it runs (loss, backward, hooks, eval density, sampling) follows
  its inputs' device: run with torch's default device made ``meta``, which mixes with no real device;
* the trainer's hooks (``data_init``, ``after_optimizer_step``, ``diagnostics_summary``,
  ``layer_stats``, ``find_nonfinite``) exist and run, and ``find_nonfinite`` names a NaN parameter;

plus ``VARIANTS``: layer choices that build layers a family's tiny config does not (Flow++'s
affine coupling and its argmax dequantizer, one-hot argmax, RNODE's regularisers, every vector
flow kind, the VAE's other posterior flows, ...), held to the same contract.  And every
``experiments/*.yaml`` with ``paper.params`` set builds (on the meta device) with exactly that
many parameters, or with the documented count of ``PARAMS_DIFFER``.  Known bugs are strict xfails.

A new family must add a line to ``TINY``, ``LIKELIHOOD`` and ``DATA_KIND`` (a test fails until
it does); a new paper config is checked automatically.  Config names live in ``TINY`` /
``VARIANTS`` only: a renamed knob is a one-line change per family here.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

import pytest
import torch

from engine.config import load_config
from engine.objective_bnn import LabelledBatch
from engine.objectives import build_objective
from models.architectures import ARCHITECTURES
from tests.helpers import (ROOT, PixelRangeError, assert_all_parameters_get_gradient, assert_encode_decode_exact,
                           assert_integer_images, build_flow, data_shape, estimated_logdet_layers, meta_parameter_count,
                           random_images, resolve_overrides, training_loss)

DATA_SHAPE = (3, 8, 8)

# ---- the tiny configs: ONE place for config names ---------------------------------------------
# family -> dotted overrides (model.name is added); each builds in a few milliseconds.  Where a
# family's inverse is numerical the tolerances are tight enough for an exact integer round trip.
TINY = {
    "glow": ["model.levels=2", "model.steps=1", "model.hidden_channels=8"],
    "flowpp": ["model.steps=[1,1,1]", "model.hidden_channels=8", "model.hidden_blocks=1", "model.heads=2",
               "model.components=3", "dequantizer.steps=1", "dequantizer.hidden_channels=8",
               "dequantizer.hidden_blocks=1", "dequantizer.heads=2", "dequantizer.components=3",
               "dequantizer.context_channels=4", "dequantizer.context_blocks=1"],
    "resflow": ["model.steps=[1,1]", "model.hidden_channels=8", "model.fc_steps=1", "model.fc_hidden_channels=8",
                "model.n_exact_terms_eval=2", "model.inverse_atol=1e-9", "model.inverse_rtol=1e-9",
                "model.inverse_max_iters=30"],  # float64 converges in < 10 iterations; float32 stops at 30
    "realnvp": ["model.levels=2", "model.hidden_blocks=1", "model.hidden_channels=8"],
    "ffjord": ["model.levels=2", "model.steps=1", "model.hidden_channels=[4]", "model.end_time=0.5", "model.atol=1e-3",
               "model.rtol=1e-3", "model.test_solver=rk4", "model.test_step_size=0.0625"],  # round trip to ~1e-8 px
    "idf": ["model.levels=2", "model.steps=2", "model.hidden_channels=8", "model.hidden_blocks=2"],
    "argmax": ["data.n_bits=3", "model.levels=2", "model.steps=1", "model.hidden_channels=8", "dequantizer.steps=1",
               "dequantizer.hidden_channels=8", "dequantizer.hidden_blocks=1", "dequantizer.components=3",
               "dequantizer.heads=2", "dequantizer.context_channels=4", "dequantizer.context_blocks=1"],
    "discrete_flow": ["data.n_bits=2", "model.steps=2", "model.hidden_channels=8", "model.hidden_blocks=1"],
    # vectors: 2-D toy data, trained by maximum likelihood in nats
    "vector_flow": ["model.flow=realnvp", "model.steps=2", "model.hidden_channels=8", "model.hidden_blocks=1",
                    "data.name=toy2d", "objective.name=nll"],
    # not a flow: a VAE with K=2 planar posterior steps on 1-bit images, its negative ELBO
    "flow_vae": ["model.flow=planar", "model.steps=2", "model.latent_dim=4", "model.hidden_channels=8",
                 "data.name=fashion_mnist", "data.n_bits=1", "objective.name=elbo"],
    # not a flow: a Bayesian LeNet (MNF, one flow step each way) on labelled images, its negative ELBO
    "bnn": ["model.kind=mnf", "model.hidden_channels=[2,3]", "model.fc_hidden_channels=8", "model.num_classes=4",
            "model.steps=1", "model.reverse_steps=1", "model.flow_hidden_channels=16", "objective.name=bnn",
            "objective.samples=2"],
}

# name -> (family, overrides on top of TINY[family]): options that build other layers.
VARIANTS = {
    "flowpp-affine": ("flowpp", ["model.components=0", "dequantizer.components=0"]),
    "flowpp-no-attention": ("flowpp", ["model.attention=false", "dequantizer.attention=false"]),
    "flowpp-uniform-dequant": ("flowpp", ["dequantizer.kind=uniform"]),
    "flowpp-argmax-dequant": ("flowpp", ["dequantizer.kind=argmax", "data.n_bits=3"]),
    "argmax-onehot": ("argmax", ["dequantizer.encoding=onehot", "data.n_bits=2"]),
    "discrete_flow-binary-shift": ("discrete_flow", ["data.n_bits=1", "model.mask=channel", "model.scale=false"]),
    "discrete_flow-k8-checkerboard": ("discrete_flow", ["data.n_bits=3", "model.mask=checkerboard"]),
    "resflow-plain-backward": ("resflow", ["model.mem_efficient=false"]),
    "ffjord-rnode": ("ffjord", ["model.kinetic_energy=0.01", "model.jacobian_norm2=0.01"]),
    "ffjord-rnode-concatsquash": ("ffjord", ["model.kinetic_energy=0.01", "model.jacobian_norm2=0.01",
                                             "model.layer_type=concatsquash"]),
    # every other vector flow kind (vector_flow itself is realnvp)
    "vector_flow-nice": ("vector_flow", ["model.flow=nice"]),
    "vector_flow-maf": ("vector_flow", ["model.flow=maf"]),
    "vector_flow-iaf": ("vector_flow", ["model.flow=iaf"]),
    "vector_flow-planar": ("vector_flow", ["model.flow=planar"]),
    "vector_flow-radial": ("vector_flow", ["model.flow=radial"]),
    "vector_flow-sylvester": ("vector_flow", ["model.flow=sylvester", "model.kind=orthogonal"]),
    "vector_flow-sylvester-householder": ("vector_flow", ["model.flow=sylvester", "model.kind=householder"]),
    "vector_flow-sylvester-triangular": ("vector_flow", ["model.flow=sylvester", "model.kind=triangular"]),
    # the flow-VAE's other posterior flows
    "flow_vae-radial": ("flow_vae", ["model.flow=radial"]),
    "flow_vae-iaf": ("flow_vae", ["model.flow=iaf"]),
    "flow_vae-sylvester": ("flow_vae", ["model.flow=sylvester", "model.ortho_vectors=2"]),
    # the Bayesian classifier's other weight posteriors
    "bnn-mean_field": ("bnn", ["model.kind=mean_field"]),
    "bnn-deterministic": ("bnn", ["model.kind=deterministic"]),
}

# cases whose forward returns auxiliary losses (RNODE's regularisers, one pair per CNF block)
AUXILIARY = {"ffjord-rnode", "ffjord-rnode-concatsquash"}

# family -> (likelihood_kind, some log-det is an estimate, is_discrete), in train and eval mode.
# "bound": a layer draws noise (every dequantized family); "estimated": no noise, but a log-det is
# estimated (Russian roulette, Hutchinson); "exact": neither.  IDF alone is integer to integer.
LIKELIHOOD = {
    "glow": ("bound", False, False),
    "flowpp": ("bound", False, False),
    "resflow": ("bound", True, False),   # uniform dequantization; the roulette log-det on top
    "realnvp": ("bound", False, False),
    "ffjord": ("bound", True, False),    # uniform dequantization; Hutchinson's trace on top
    "idf": ("exact", False, True),
    "argmax": ("bound", False, False),
    "discrete_flow": ("exact", False, True),  # mod-K bijections of one-hots, a categorical base
    "vector_flow": ("exact", False, False),  # every kind: closed-form log-dets, no noise
    "flow_vae": ("bound", False, False),     # the ELBO: a bound on log p(x) (checked against importance sampling)
    "bnn": ("bound", False, False),          # log p(y | x, W) at a fresh weight draw (tests/test_mnf.py: the bounds)
}
# cases whose likelihood differs from their family's
CASE_LIKELIHOOD = {"bnn-deterministic": ("exact", False, False)}  # point-estimate weights: no noise


def likelihood_of(case: str) -> tuple:
    return CASE_LIKELIHOOD.get(case, LIKELIHOOD[family_of(case)])

# ---- the data each family takes: ONE place ---------------------------------------------------
# family -> "image" (integer images in [0, 2^bits - 1] of DATA_SHAPE, objective bpd), "vector"
# (continuous float vectors of shape (D,), objective nll) or "binary" (1-bit images of VAE_SHAPE,
# flattened by the model, objective elbo: the flow-VAE, which is not a Flow).
DATA_KIND = {
    "glow": "image", "flowpp": "image", "resflow": "image", "realnvp": "image", "ffjord": "image", "idf": "image",
    "argmax": "image", "discrete_flow": "image", "vector_flow": "vector", "flow_vae": "binary", "bnn": "labelled",
}
OBJECTIVE_OF_KIND = {"image": "bpd", "vector": "nll", "binary": "elbo", "labelled": "bnn"}
VAE_SHAPE = (1, 8, 8)
LABELLED_SHAPE = (3, 16, 16)  # the smallest images two 5x5 convolutions and 2x2 poolings take

# families whose samples may leave [0, 2^bits - 1] (a known bug, see the test)
SAMPLES_LEAVE_THE_PIXEL_RANGE: dict[str, str] = {}  # none today (IDF's samples once did: its shift now clamps)

CASES = sorted(ARCHITECTURES) + sorted(VARIANTS)


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the thread pool's
    contention makes these tests several times slower; restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def family_of(case: str) -> str:
    return VARIANTS[case][0] if case in VARIANTS else case


def case_config(case: str) -> dict:
    """The resolved config of a case (``KeyError`` for a registered family without ``TINY``)."""
    family = family_of(case)
    extra = VARIANTS[case][1] if case in VARIANTS else []
    return resolve_overrides([f"model.name={family}", *TINY[family], *extra])


@dataclass(frozen=True)
class Data:
    """What a case's model takes: ``kind`` (see ``DATA_KIND``), the shape of one example and the bit
    depth (None: continuous vectors).  ``batch`` draws inputs of that kind, ``objective`` the loss."""
    kind: str
    shape: tuple
    bits: int | None
    objective: dict

    def batch(self, n: int, device, generator: torch.Generator | None = None, dtype: torch.dtype | None = None):
        if self.kind == "labelled":  # integer images with labels in [0, num_classes) of the tiny config (4)
            labels = torch.randint(0, 4, (n,), generator=generator)
            return LabelledBatch(random_images(n, self.shape, self.bits, device, generator=generator), labels.to(device))
        if self.kind == "vector":  # continuous vectors, N(0, I)-like (the toys are standardised to that scale)
            return torch.randn(n, *self.shape, generator=generator, dtype=torch.float64).to(
                dtype or torch.get_default_dtype()).to(device)
        return random_images(n, self.shape, self.bits, device, generator=generator)  # uint8, as the data layer's

    def loss(self, model, x):
        """(loss, logs) of the family's own objective (``engine.objectives``), as the trainer calls it."""
        return build_objective(self.objective)(model, x)


def case_data(case: str) -> Data:
    cfg = case_config(case)
    kind = DATA_KIND[family_of(case)]
    assert cfg["objective"]["name"] == OBJECTIVE_OF_KIND[kind], (case, cfg["objective"])
    if kind == "image":
        return Data(kind, DATA_SHAPE, cfg["data"]["n_bits"], cfg["objective"])
    if kind == "vector":
        assert cfg["data"]["name"] == "toy2d", "vector cases train on the 2-D toys"
        return Data(kind, (2,), None, cfg["objective"])
    if kind == "labelled":
        return Data(kind, LABELLED_SHAPE, cfg["data"]["n_bits"], cfg["objective"])
    assert cfg["data"]["n_bits"] == 1, "the flow-VAE takes binary images"
    return Data(kind, VAE_SHAPE, 1, cfg["objective"])


def cases_of(*kinds: str) -> list[str]:
    # .get: a family registered without DATA_KIND must fail the guard test, not the module's collection
    return [c for c in CASES if DATA_KIND.get(family_of(c)) in kinds]


IMAGE_CASES, VECTOR_CASES, VAE_CASES = cases_of("image"), cases_of("vector"), cases_of("binary")
FLOW_CASES = cases_of("image", "vector")  # the Flows (log_prob, encode / decode, likelihood_kind)


def tiny_model(case: str, device, dtype: torch.dtype | None = None):
    """(model, data): the case's tiny model on ``device``, zero-init parameters perturbed, data init done
    on a batch of the case's data (``case_data``)."""
    data = case_data(case)
    model = build_flow(case_config(case), data.shape, device, dtype, perturb=0.05)
    model.data_init(data.batch(16, device, dtype=dtype))
    return model, data


def density(model, x):
    """The per-example number a case's model reports: log p(x) of a Flow, the ELBO of the VAE,
    log p(y | x, W) of the classifier (``x`` a LabelledBatch)."""
    if isinstance(x, LabelledBatch):
        return model.log_likelihood(x.images, x.labels)
    return model.log_prob(x) if hasattr(model, "log_prob") else model.elbo(x)


# ---- the registry is covered ----------------------------------------------------------------

def test_every_registered_family_has_a_tiny_config_and_a_stated_likelihood():
    assert set(TINY) == set(ARCHITECTURES), (
        f"tiny configs missing for {sorted(set(ARCHITECTURES) - set(TINY))}, "
        f"stale for {sorted(set(TINY) - set(ARCHITECTURES))}: add the family to TINY in tests/test_contract.py")
    assert set(LIKELIHOOD) == set(ARCHITECTURES), "state each family's likelihood kind in LIKELIHOOD"
    assert set(CASE_LIKELIHOOD) <= set(VARIANTS)
    assert set(DATA_KIND) == set(ARCHITECTURES), "state the data each family takes in DATA_KIND"
    assert set(DATA_KIND.values()) <= set(OBJECTIVE_OF_KIND)
    assert all(family in ARCHITECTURES and name not in ARCHITECTURES for name, (family, _) in VARIANTS.items())
    assert AUXILIARY <= set(CASES) and set(SAMPLES_LEAVE_THE_PIXEL_RANGE) <= set(ARCHITECTURES)


@pytest.mark.parametrize("case", CASES)
def test_tiny_config_resolves_and_stays_tiny(case):
    cfg = case_config(case)  # the same validation as users' configs: unknown keys and bad values fail here
    assert cfg["model"]["name"] == family_of(case)
    n = meta_parameter_count(cfg, case_data(case).shape)  # a deterministic stand-in for "builds and runs in milliseconds"
    assert 0 < n < 500_000, f"{case}: {n:,} parameters is not a tiny model"


MADE_CASES = ["vector_flow-maf", "vector_flow-iaf", "flow_vae-iaf"]


@pytest.mark.parametrize("case", MADE_CASES)
def test_made_models_build_on_the_meta_device(case):
    cfg = case_config(case)
    assert meta_parameter_count(cfg, case_data(case).shape) == sum(
        p.numel() for p in build_flow(cfg, case_data(case).shape).parameters())


# ---- density ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", FLOW_CASES)
def test_log_prob_and_forward_with_auxiliary_losses(case, device):
    model, data = tiny_model(case, device)
    model.train()
    x = data.batch(4, device)
    torch.manual_seed(1)
    log_p = model.log_prob(x)
    assert log_p.shape == (4,) and log_p.dtype == torch.float32 and log_p.device.type == device.type
    assert bool(torch.isfinite(log_p).all()), log_p
    torch.manual_seed(1)
    out, aux = model(x, return_aux=True)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert torch.equal(out, log_p), "the same seed must give the same forward, with or without its auxiliary losses"
    assert isinstance(aux, dict) and bool(aux) == (case in AUXILIARY), sorted(aux)
    for name, value in aux.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, (name, value)
        assert value.is_floating_point() and bool(torch.isfinite(value)) and value.device.type == device.type, name


@pytest.mark.parametrize("case", VAE_CASES)
def test_vae_elbo_and_forward_terms(case, device):
    """The VAE is not a Flow: no ``log_prob`` and no ``return_aux`` (its forward takes ``samples``).
    ``elbo(x)`` is float32 (B,) and finite, and is the sum of the two terms its forward returns
    (what ``objective.name=elbo`` calls), each (S, B), under the same seed."""
    model, data = tiny_model(case, device)
    model.train()
    x = data.batch(4, device)
    assert not hasattr(model, "log_prob") and not hasattr(model, "likelihood_kind")
    torch.manual_seed(1)
    elbo = model.elbo(x)
    assert elbo.shape == (4,) and elbo.dtype == torch.float32 and elbo.device.type == device.type
    assert bool(torch.isfinite(elbo).all()), elbo
    assert bool((elbo < 0).all()), "a Bernoulli ELBO is a log-probability bound: below 0 nats"
    torch.manual_seed(1)
    rec, kl_term = model(x)
    assert rec.shape == kl_term.shape == (1, 4) and rec.dtype == kl_term.dtype == torch.float32
    assert torch.equal(rec[0] + kl_term[0], elbo)
    assert bool((rec <= 0).all()), "log p(x | z) of binary data under a Bernoulli is at most 0"
    rec3, kl3 = model(x, samples=3)
    assert rec3.shape == kl3.shape == (3, 4)
    with pytest.raises(TypeError):
        model(x, return_aux=True)  # not offered: a VAE has no auxiliary losses (update this if it gets them)


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_gets_a_gradient(case, device):
    """From the loss of the family's own objective (bpd / nll / elbo), called as the trainer calls it;
    for images it is the trainer's loss of ``training_loss`` to the last bit (same seed)."""
    model, data = tiny_model(case, device)
    model.train()
    x = data.batch(8, device)
    torch.manual_seed(3)
    loss, logs = data.loss(model, x)
    assert loss.dim() == 0 and bool(torch.isfinite(loss)), (loss, logs)
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values()), logs
    if data.kind == "image":
        torch.manual_seed(3)
        assert torch.equal(training_loss(model, x)[0], loss)
    assert_all_parameters_get_gradient(model, loss)
    # row-major parameters, as their optimizer moments are when read back from a checkpoint (a fused
    # optimizer pairs them by memory position)
    assert [n for n, p in model.named_parameters() if not p.is_contiguous()] == []


@pytest.mark.parametrize("case", FLOW_CASES)
def test_likelihood_kind_is_the_stated_one(case, device):
    kind, estimated, discrete = LIKELIHOOD[family_of(case)]
    model, data = tiny_model(case, device)
    for train in (True, False):
        model.train(train)
        assert model.likelihood_kind == kind, (train, model.likelihood_kind)
        assert model.is_stochastic == (kind == "bound") and model.is_exact == (kind == "exact")
        assert bool(estimated_logdet_layers(model)) == estimated, estimated_logdet_layers(model)
        assert model.is_discrete == discrete
    if discrete:  # an exact discrete log P(x): a probability, so at most 0 nats
        with torch.no_grad():
            assert bool((model.log_prob(data.batch(4, device)) <= 0).all())


@pytest.mark.parametrize("case", VAE_CASES)
def test_vae_elbo_is_a_bound_below_importance_sampled_log_px(case, device):
    """LIKELIHOOD says "bound": on average over a batch the importance-sampled log p(x) (S = 512)
    lies above the mean of 64 ELBO draws (Jensen: E log w <= log E w; the IS estimate's bias is
    O(1/S), far below the gap of an untrained posterior); S = 1 is one ELBO draw (same seed); every
    posterior log-det is exact (the bound comes from q, not from an estimator)."""
    assert LIKELIHOOD[family_of(case)] == ("bound", False, False)
    model, data = tiny_model(case, device)
    model.eval()
    assert not estimated_logdet_layers(model) and all(t.exact_ldj for _, t in model.layers())
    x = data.batch(8, device, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(4)
    elbo = torch.stack([model.elbo(x) for _ in range(64)]).mean(0)
    log_px = model.importance_log_px(x, samples=512, chunk=128)
    assert log_px.shape == (8,) and bool(torch.isfinite(log_px).all())
    assert log_px.mean() >= elbo.mean(), (log_px, elbo)
    torch.manual_seed(5)
    one = model.importance_log_px(x, samples=1)
    torch.manual_seed(5)
    assert torch.allclose(one, model.elbo(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_eval_log_prob_is_reproducible_from_a_seed(case, device):
    """Two builds from the same seed, each data-initialised on the same batch, give the same eval
    log_prob (the VAE: ELBO) under the same seed; a repeated call without re-seeding gives the same
    number exactly when the family is exact (no noise, no estimator), and another draw otherwise."""
    kind = likelihood_of(case)[0]
    seeded, repeated = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model, data = tiny_model(case, device)
        model.eval()
        x = data.batch(4, device, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.manual_seed(2)
            seeded.append(density(model, x))
            repeated.append(density(model, x))
    assert torch.equal(seeded[0], seeded[1]), (seeded, "the same seed, build and init must give the same log_prob")
    assert torch.equal(repeated[0], repeated[1])
    if kind == "exact":
        assert torch.equal(repeated[0], seeded[0]), "an exact model's eval log_prob must be deterministic"
    else:
        assert not torch.equal(repeated[0], seeded[0]), f"a '{kind}' log_prob must draw fresh noise per call"


# ---- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, raises=PixelRangeError,
                                            reason=SAMPLES_LEAVE_THE_PIXEL_RANGE[family_of(c)]))
    if family_of(c) in SAMPLES_LEAVE_THE_PIXEL_RANGE else c for c in IMAGE_CASES])
def test_sample_returns_distinct_integer_images_in_the_pixel_range(case, device):
    """(Where SAMPLES_LEAVE_THE_PIXEL_RANGE states a known bug, only the range check may fail: any
    other failure fails the test, and a fix makes it pass, i.e. fail as strict, until the entry goes.)"""
    model, data = tiny_model(case, device)
    model.eval()
    s = model.sample(4)
    assert s.shape == (4, *DATA_SHAPE) and s.device.type == device.type
    assert_integer_images(s, DATA_SHAPE)
    assert len({tuple(img.flatten().tolist()) for img in s}) == 4, "noise was not drawn per sample"
    assert_integer_images(s, DATA_SHAPE, data.bits)  # raises PixelRangeError outside [0, 2^bits - 1]


@pytest.mark.parametrize("case", VECTOR_CASES)
def test_sample_returns_distinct_finite_vectors(case, device):
    model, data = tiny_model(case, device)
    model.eval()
    s = model.sample(4)
    assert s.shape == (4, *data.shape) and s.dtype == torch.float32 and s.device.type == device.type
    assert bool(torch.isfinite(s).all()), s
    assert len({tuple(v.tolist()) for v in s}) == 4, "noise was not drawn per sample"
    assert bool(torch.isfinite(model.log_prob(s)).all()), "samples must have a finite density"


@pytest.mark.parametrize("case", VECTOR_CASES)
def test_sample_follows_the_model_dtype(case, device):
    """A float64 model under the default float32 dtype (without the ``float64`` fixture)."""
    model, data = tiny_model(case, device, dtype=torch.float64)
    model.eval()
    assert model.sample(4).dtype == torch.float64


@pytest.mark.parametrize("case", VAE_CASES)
def test_vae_sample_returns_binary_images(case, device):
    """``sample`` documents binary images x ~ p(x | z) shaped as the data; ``sample_means`` their
    Bernoulli means in [0, 1]."""
    model, data = tiny_model(case, device)
    model.eval()
    s = model.sample(4)
    assert s.shape == (4, *data.shape) and s.device.type == device.type
    assert bool(((s == 0) | (s == 1)).all()), s.unique()
    assert len({tuple(img.flatten().tolist()) for img in s}) == 4, "noise was not drawn per sample"
    means = model.sample_means(4, temperature=0.7)
    assert means.shape == (4, *data.shape) and bool(((means >= 0) & (means <= 1)).all())


# ---- exact latents --------------------------------------------------------------------------------

# vector round trips in float64: closed-form inverses to EXACT_INVERSE_ATOL; numerical ones (planar's
# and Sylvester's bisection, 80 halvings of a bracket of width 2|c|, and Sylvester-orthogonal's Q, which
# is orthogonal only to 1e-7 but is the same Q both ways) to NUMERICAL_INVERSE_ATOL (seen: ~1e-11)
EXACT_INVERSE_ATOL, NUMERICAL_INVERSE_ATOL = 1e-10, 1e-8


@pytest.mark.parametrize("case", FLOW_CASES)
def test_encode_decode_round_trip_is_exact(case, device, float64):
    """float64: the continuous part inverts to ~1e-8 of a bin or better (TINY's tolerances), so floor
    recovers every pixel (in float32 a pixel whose noise lands within rounding of a bin edge may not).
    Vectors: decode(*encode(x)) is x to the tolerance of the layers' inverses (MAF's sequential one is
    closed form, D passes)."""
    model, data = tiny_model(case, device, dtype=torch.float64)
    model.eval()
    x = data.batch(4, device, dtype=torch.float64)
    if data.kind == "image":
        eps, latents = assert_encode_decode_exact(model, x)
    else:
        with torch.no_grad():
            eps, latents = model.encode(x)
            x_rec = model.decode(eps, latents)
        assert x_rec.shape == x.shape and x_rec.dtype == torch.float64
        exact = all(t.exact_inverse for _, t in model.layers())
        assert exact == (model_flow(case) not in ("planar", "sylvester")), model_flow(case)
        atol = EXACT_INVERSE_ATOL if exact else NUMERICAL_INVERSE_ATOL
        err = (x_rec - x).abs().max().item()
        assert err <= atol, f"max |decode(encode(x)) - x| = {err:.3e} > {atol:.0e}"
    assert eps.shape[0] == 4 and all(latent.shape[0] == 4 for latent in latents)
    assert len(latents) == len(model.factor_out_layers())


def model_flow(case: str) -> str:
    return case_config(case)["model"]["flow"]


# ---- device placement -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_no_tensor_is_made_on_the_default_device_while_the_model_runs(case, device):
    """Every tensor a layer makes while it runs follows its inputs' device (``device=x.device``) or is
    deliberately on the host (``device="cpu"``: a draw that steers Python control flow); one made
    without a device lands on torch's default device and breaks the first run on a GPU.  The test
    makes the default device ``meta``, which mixes with no real device (even a 0-dim tensor raises),
    and runs the objective's loss and backward, the ``after_optimizer_step`` hook, the eval-mode
    density and ``sample`` of a model built on ``device`` beforehand."""
    model, data = tiny_model(case, device)
    x = data.batch(4, device)
    torch.manual_seed(0)
    with torch.device("meta"):
        model.train()
        loss, _ = data.loss(model, x)
        loss.backward()
        model.after_optimizer_step()
        model.eval()
        with torch.no_grad():
            value = density(model, x)
            samples = model.sample(2) if data.kind != "labelled" else None
    assert value.device.type == device.type and loss.device.type == device.type
    assert samples is None or samples.device.type == device.type


# ---- the trainer's hooks ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_trainer_hooks_exist_and_run(case, device):
    """The hooks the trainer calls on every model (``models.core.hooks``): ``data_init``,
    ``after_optimizer_step``, ``diagnostics_summary``, ``layer_stats``, ``find_nonfinite``, on the
    case's data; ``find_nonfinite`` is None on a healthy model and names a NaN parameter."""
    model, data = tiny_model(case, device)
    model.train()
    x = data.batch(4, device)
    model.data_init(x)  # again: idempotent
    model.after_optimizer_step()
    summary = model.diagnostics_summary()
    assert isinstance(summary, dict) and all(isinstance(v, float) for v in summary.values()), summary
    stats = model.layer_stats(x)
    assert isinstance(stats, dict) and all(isinstance(v, float) and math.isfinite(v) for v in stats.values()), stats
    if data.kind in ("vector", "binary"):  # the vector flows and the VAE report their layers
        assert any(k.endswith("/ldj_mean") for k in stats), sorted(stats)
    if data.kind == "labelled":  # the classifier: each layer's KL term
        assert {k.split("/")[0] for k in stats if k.endswith("/kl")} == {"conv1", "conv2", "fc1", "fc2"}, sorted(stats)
    assert model.find_nonfinite(x) is None
    name, p = next(iter(model.named_parameters()))
    with torch.no_grad():
        p[(0,) * p.dim()] = float("nan")
    bad = model.find_nonfinite(x)
    assert isinstance(bad, str) and "non-finite" in bad, bad


# ---- parameter counts of the paper configs ------------------------------------------------------

PAPER_CONFIGS = sorted(
    os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "experiments", "*.yaml"))
    if load_config(path)["paper"]["params"] is not None)

# paper configs whose paper.params is not our count: config -> (our exact count, why)
PARAMS_DIFFER = {
    "glow_cifar10.yaml": (44_603_604, "paper.params is the paper's rounded 44.6M; ours follows the official code"),
    "resflow_cifar10.yaml": (25_174_233 - 2 * 52, "the official code also registers 2 roulette settings "
                                                  "(lamb, geom_p) as untrained parameters in each of its 52 blocks"),
}


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_config_parameter_count(config):
    cfg = load_config(os.path.join(ROOT, "experiments", config))
    n, paper = meta_parameter_count(cfg, data_shape(cfg)), cfg["paper"]["params"]
    if config not in PARAMS_DIFFER:
        assert n == paper, f"{config}: {n:,} parameters, paper.params says {paper:,}"
        return
    ours, why = PARAMS_DIFFER[config]
    assert n == ours, f"{config}: {n:,} parameters, expected {ours:,} ({why})"
    assert n != paper, f"{config} now has exactly paper.params: remove it from PARAMS_DIFFER"
    assert abs(n - paper) <= 1e-3 * paper, (n, paper)


def test_paper_configs_are_found_and_the_exceptions_are_paper_configs():
    assert len(PAPER_CONFIGS) >= 8, PAPER_CONFIGS
    assert set(PARAMS_DIFFER) <= set(PAPER_CONFIGS), sorted(set(PARAMS_DIFFER) - set(PAPER_CONFIGS))
