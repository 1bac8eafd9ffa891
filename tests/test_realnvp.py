"""Whole-model tests of multi-scale RealNVP (models/architectures/realnvp.py).

* log p(x) of a tiny RealNVP in eval mode equals a brute-force computation: with the
  dequantization noise fixed, (x + u)/256 goes through a bijection onto all latents
  (every factored-out half and the top z); its log|det| comes from the autograd Jacobian
  and the N(0, I) priors are evaluated by hand.
* the structure follows the paper; the paper config's parameter count (ours: the paper
  gives none); the small config trains through train.py and its test bits/dim falls.

Encode/decode, sampling and gradients of every parameter in train mode (batch statistics,
weight norm): tests/test_contract.py.
"""
from __future__ import annotations

import math
import os
import sys

import torch

from engine.config import load_config
from engine.setup import count_parameters
from models.architectures import build_model, realnvp
from models.core.distributions import LOG_2PI
from models.transforms.bijections.batch_norm import BatchNormBijection
from models.transforms.surjections.split import Split
from models.transforms.surjections.uniform_dequantization import UniformDequantization
from tests.helpers import jacobian_logdet, perturb_parameters, read_metric, run_command

ROOT = os.path.join(os.path.dirname(__file__), "..")
DATA_SHAPE = (3, 4, 4)


def tiny_realnvp(**overrides):
    cfg = {"name": "realnvp", **realnvp.DEFAULTS, "levels": 2, "hidden_blocks": 1, "hidden_channels": 8,
           "weight_norm": False, **overrides}
    model = build_model(cfg, DATA_SHAPE, 8).to(torch.get_default_dtype())
    # move the zero-initialised conditioner outputs off zero and give the batch norms
    # non-trivial running statistics, so no layer is the identity
    for m in model.modules():
        if hasattr(m, "out") and isinstance(getattr(m, "out"), torch.nn.Conv2d):
            perturb_parameters(m.out, std=0.05)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.log_prob(torch.randint(0, 256, (16, *DATA_SHAPE)).to(torch.get_default_dtype()))
    return model


def test_log_prob_matches_brute_force(float64):
    model = tiny_realnvp().eval()
    x = torch.randint(0, 256, (2, *DATA_SHAPE)).double()
    deq = model.transforms[0]
    assert isinstance(deq, UniformDequantization)
    torch.manual_seed(5)
    y, ldj_deq = deq(x)
    rest = list(model.transforms[1:])

    def to_latents(v):
        z, outs = v, []
        for t in rest:
            if isinstance(t, Split):
                x1, x2 = z[:, : t.keep_channels], z[:, t.keep_channels:]
                outs.append(x2.reshape(x2.shape[0], -1))
                z = x1
            else:
                z, _ = t(z)
        outs.append(z.reshape(z.shape[0], -1))
        return torch.cat(outs, dim=1)

    logdet = jacobian_logdet(to_latents, y)
    with torch.no_grad():
        lat = to_latents(y)
    prior = (-0.5 * LOG_2PI - 0.5 * lat ** 2).sum(dim=1)  # every latent is N(0, 1) (standard factor-out)
    expected = ldj_deq.double() + logdet + prior
    torch.manual_seed(5)
    with torch.no_grad():
        got = model.log_prob(x)
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)


def test_structure_follows_the_paper():
    cfg = {"name": "realnvp", **realnvp.DEFAULTS, "hidden_blocks": 1, "hidden_channels": 4}
    model = build_model(cfg, (3, 32, 32), 8)
    kinds = [type(t).__name__ for t in model.transforms if not isinstance(t, BatchNormBijection)]
    assert kinds == (["UniformDequantization", "Logit"] + ["MaskedAffineCoupling"] * 3 + ["Squeeze"]
                     + ["MaskedAffineCoupling"] * 3 + ["Split"] + ["MaskedAffineCoupling"] * 4)
    assert sum(isinstance(t, BatchNormBijection) for t in model.transforms) == 10
    assert model.base.shape == (6, 16, 16)


def test_paper_config_parameter_count():
    cfg = load_config(os.path.join(ROOT, "experiments", "realnvp_cifar10.yaml"))
    model = build_model(cfg["model"], (3, 32, 32), 8, cfg["dequantizer"])
    assert count_parameters(model) == 6_061_337  # ours (the paper gives no count); guards against drift
    assert cfg["paper"]["bpd"] == 3.49 and cfg["train"]["batch_size"] == 64 and cfg["data"]["hflip"] is True
    assert cfg["train"]["weight_decay"] == 5e-5


def test_small_config_trains_through_train_py(tmp_path):
    out = tmp_path / "rn"
    args = [sys.executable, "train.py", "experiments/realnvp_small.yaml", "--out", str(out),
            "model.hidden_channels=4", "model.bn_momentum=0.2", "data.max_train=256", "data.max_test=64", "train.batch_size=8",
            "train.steps=20", "train.eval_every=20", "train.sample_every=0", "train.checkpoint_every=0",
            "train.warmup_steps=0", "train.lr=3e-3", "train.log_every=10", "eval.batch_size=64", "sample.n=2"]
    run_command(args, env={"OMP_NUM_THREADS": "1"})
    test_bpd = read_metric(out, "test/bpd")
    assert set(test_bpd) == {0, 20}
    assert math.isfinite(test_bpd[20]) and test_bpd[20] < test_bpd[0] - 0.3, test_bpd
