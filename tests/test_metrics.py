"""engine/metrics.py: bits/dim and mean +- standard error on known values."""
from __future__ import annotations

import math

import pytest
import torch

from engine.metrics import bits_per_dim, mean_and_stderr
from models.core.distributions import Uniform01
from models.core.flow import Flow
from models.transforms.surjections.uniform_dequantization import UniformDequantization


@pytest.mark.parametrize("n_bits", [8, 5])
def test_uniform_model_has_n_bits_per_dim(n_bits):
    """Dequantized uniform noise under U(0,1)^D: p(x) = K^-D exactly, so bpd = n_bits."""
    shape = (3, 4, 4)
    model = Flow([UniformDequantization(n_bits)], Uniform01(shape), shape)
    assert model.num_dims == 48
    k = 2 ** n_bits
    x = torch.randint(0, k, (5, *shape)).float()
    x[0], x[1] = 0.0, k - 1.0
    log_prob = model.log_prob(x)
    assert torch.allclose(log_prob.double(), torch.full((5,), -48 * n_bits * math.log(2.0), dtype=torch.float64))
    bpd = bits_per_dim(log_prob, model.num_dims)
    assert bpd.shape == (5,) and bpd.dtype == torch.float32
    assert torch.allclose(bpd, torch.full((5,), float(n_bits)), rtol=0, atol=1e-5)


def test_uniform_base_rejects_points_outside_the_cube():
    base = Uniform01((1, 2, 2))
    z = torch.tensor([[0.0, 0.5, 1.0, 0.2], [0.1, 0.2, 1.5, 0.3]]).reshape(2, 1, 2, 2)
    assert base.log_prob(z).tolist() == [0.0, -math.inf]


def test_bits_per_dim_conversion():
    log_prob = torch.tensor([-10 * math.log(2.0), 0.0, -30 * math.log(2.0)], dtype=torch.float64)
    assert torch.allclose(bits_per_dim(log_prob, 10), torch.tensor([1.0, 0.0, 3.0]))
    assert bits_per_dim(log_prob, 10).dtype == torch.float32


def test_mean_and_stderr_known_values():
    mean, stderr = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # unbiased std = sqrt(5/3); stderr = std / sqrt(4)
    assert mean == pytest.approx(2.5, abs=1e-12)
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    mean, stderr = mean_and_stderr(torch.full((7,), 3.25))
    assert mean == pytest.approx(3.25) and stderr == 0.0
    mean, stderr = mean_and_stderr(torch.tensor([5.0]))
    assert mean == 5.0 and math.isnan(stderr)
    assert isinstance(mean, float) and isinstance(stderr, float)


def test_eval_noise_stream_is_not_the_data_init_stream():
    """The trainer's data init draws its noise from ``train.seed``; evaluation must draw
    from another stream, per rank, or an ActNorm fitted on that very noise flatters bpd."""
    from engine.evaluate import eval_seed
    for seed in (0, 1, 42, 2**31):
        seeds = {eval_seed(seed, rank) for rank in range(4)}
        assert seed not in seeds and len(seeds) == 4
