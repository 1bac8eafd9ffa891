"""The whole-model contract, as one spec every registered family is held to.

Every architecture in ``models.architectures.ARCHITECTURES`` is built tiny (``TINY``, dotted
overrides resolved like users' configs; 3x8x8 images), its zero-initialised parameters moved
off zero (a stand-in for a few training steps, so no layer is the identity and every
parameter can get a gradient), and its data-dependent init done (``model.data_init(x)``).
Then, on the ``--device`` the suite runs on (``tests/conftest.py``):

* ``log_prob(x)`` is float32 of shape (B,) and finite; ``model(x, return_aux=True)`` gives the
  same numbers (same seed) and a dict of scalar auxiliary losses;
* the trainer's loss (mean bits/dim plus the auxiliary losses) reaches every parameter;
* ``sample(n)`` returns n distinct, finite, integer images of the data shape, in [0, 2^bits - 1];
* ``decode(*encode(x))`` gives back x bit for bit (float64, tight solver / inverse tolerances);
* the likelihood the model reports (``likelihood_kind``, estimated log-dets, ``is_discrete``)
  is the one stated per family in ``LIKELIHOOD``;
* in eval mode a seed reproduces ``log_prob`` exactly (a second build from the same seed too),
  and without re-seeding it is the same number again exactly when the family is exact;

plus ``VARIANTS``: layer choices that build layers a family's tiny config does not (Flow++'s
affine coupling and its argmax dequantizer, one-hot argmax, RNODE's regularisers, ...), held to
the same contract.  And every ``experiments/*.yaml`` with ``paper.params`` set builds (on the meta
device) with exactly that many parameters, or with the documented count of ``PARAMS_DIFFER``.

A new family must add a line to ``TINY`` and to ``LIKELIHOOD`` (a test fails until it does);
a new paper config is checked automatically.  Config names live in ``TINY`` / ``VARIANTS``
only: a renamed knob is a one-line change per family here.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from engine.config import load_config
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
}

# name -> (family, overrides on top of TINY[family]): options that build other layers.
VARIANTS = {
    "flowpp-affine": ("flowpp", ["model.components=0", "dequantizer.components=0"]),
    "flowpp-no-attention": ("flowpp", ["model.attention=false", "dequantizer.attention=false"]),
    "flowpp-uniform-dequant": ("flowpp", ["dequantizer.kind=uniform"]),
    "flowpp-argmax-dequant": ("flowpp", ["dequantizer.kind=argmax", "data.n_bits=3"]),
    "argmax-onehot": ("argmax", ["dequantizer.encoding=onehot", "data.n_bits=2"]),
    "resflow-plain-backward": ("resflow", ["model.mem_efficient=false"]),
    "ffjord-rnode": ("ffjord", ["model.kinetic_energy=0.01", "model.jacobian_norm2=0.01"]),
    "ffjord-rnode-concatsquash": ("ffjord", ["model.kinetic_energy=0.01", "model.jacobian_norm2=0.01",
                                             "model.layer_type=concatsquash"]),
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
}

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


def tiny_model(case: str, device, dtype: torch.dtype | None = None):
    """(model, n_bits): the case's tiny model on ``device``, zero-init parameters perturbed, data init done."""
    cfg = case_config(case)
    bits = cfg["data"]["n_bits"]
    model = build_flow(cfg, DATA_SHAPE, device, dtype, perturb=0.05)
    model.data_init(random_images(16, DATA_SHAPE, bits, device))
    return model, bits


# ---- the registry is covered ----------------------------------------------------------------

def test_every_registered_family_has_a_tiny_config_and_a_stated_likelihood():
    assert set(TINY) == set(ARCHITECTURES), (
        f"tiny configs missing for {sorted(set(ARCHITECTURES) - set(TINY))}, "
        f"stale for {sorted(set(TINY) - set(ARCHITECTURES))}: add the family to TINY in tests/test_contract.py")
    assert set(LIKELIHOOD) == set(ARCHITECTURES), "state each family's likelihood kind in LIKELIHOOD"
    assert all(family in ARCHITECTURES and name not in ARCHITECTURES for name, (family, _) in VARIANTS.items())
    assert AUXILIARY <= set(CASES) and set(SAMPLES_LEAVE_THE_PIXEL_RANGE) <= set(ARCHITECTURES)


@pytest.mark.parametrize("case", CASES)
def test_tiny_config_resolves_and_stays_tiny(case):
    cfg = case_config(case)  # the same validation as users' configs: unknown keys and bad values fail here
    assert cfg["model"]["name"] == family_of(case)
    n = meta_parameter_count(cfg, DATA_SHAPE)  # a deterministic stand-in for "builds and runs in milliseconds"
    assert 0 < n < 500_000, f"{case}: {n:,} parameters is not a tiny model"


# ---- density ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_log_prob_and_forward_with_auxiliary_losses(case, device):
    model, bits = tiny_model(case, device)
    model.train()
    x = random_images(4, DATA_SHAPE, bits, device)
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


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_gets_a_gradient(case, device):
    model, bits = tiny_model(case, device)
    model.train()
    loss, _, _ = training_loss(model, random_images(8, DATA_SHAPE, bits, device))
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    assert_all_parameters_get_gradient(model, loss)


@pytest.mark.parametrize("case", CASES)
def test_likelihood_kind_is_the_stated_one(case, device):
    kind, estimated, discrete = LIKELIHOOD[family_of(case)]
    model, bits = tiny_model(case, device)
    for train in (True, False):
        model.train(train)
        assert model.likelihood_kind == kind, (train, model.likelihood_kind)
        assert model.is_stochastic == (kind == "bound") and model.is_exact == (kind == "exact")
        assert bool(estimated_logdet_layers(model)) == estimated, estimated_logdet_layers(model)
        assert model.is_discrete == discrete
    if discrete:  # an exact discrete log P(x): a probability, so at most 0 nats
        with torch.no_grad():
            assert bool((model.log_prob(random_images(4, DATA_SHAPE, bits, device)) <= 0).all())


@pytest.mark.parametrize("case", CASES)
def test_eval_log_prob_is_reproducible_from_a_seed(case, device):
    """Two builds from the same seed, each data-initialised on the same batch, give the same eval
    log_prob under the same seed; a repeated call without re-seeding gives the same number exactly
    when the family is exact (no noise, no estimator), and another draw otherwise."""
    kind = LIKELIHOOD[family_of(case)][0]
    seeded, repeated = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model, bits = tiny_model(case, device)
        model.eval()
        x = random_images(4, DATA_SHAPE, bits, device, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.manual_seed(2)
            seeded.append(model.log_prob(x))
            repeated.append(model.log_prob(x))
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
    if family_of(c) in SAMPLES_LEAVE_THE_PIXEL_RANGE else c for c in CASES])
def test_sample_returns_distinct_integer_images_in_the_pixel_range(case, device):
    """(Where SAMPLES_LEAVE_THE_PIXEL_RANGE states a known bug, only the range check may fail: any
    other failure fails the test, and a fix makes it pass, i.e. fail as strict, until the entry goes.)"""
    model, bits = tiny_model(case, device)
    model.eval()
    s = model.sample(4)
    assert s.shape == (4, *DATA_SHAPE) and s.device.type == device.type
    assert_integer_images(s, DATA_SHAPE)
    assert len({tuple(img.flatten().tolist()) for img in s}) == 4, "noise was not drawn per sample"
    assert_integer_images(s, DATA_SHAPE, bits)  # raises PixelRangeError outside [0, 2^bits - 1]


# ---- exact latents --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_encode_decode_round_trip_is_exact(case, device, float64):
    """float64: the continuous part inverts to ~1e-8 of a bin or better (TINY's tolerances), so floor
    recovers every pixel (in float32 a pixel whose noise lands within rounding of a bin edge may not)."""
    model, bits = tiny_model(case, device, dtype=torch.float64)
    model.eval()
    x = random_images(4, DATA_SHAPE, bits, device)
    eps, latents = assert_encode_decode_exact(model, x)
    assert eps.shape[0] == 4 and all(latent.shape[0] == 4 for latent in latents)
    assert len(latents) == len(model.factor_out_layers())


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
