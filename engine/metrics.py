"""bits/dim: the one place where log-likelihoods become bits per dimension.

    bpd(x) = -log p(x) / (D ln 2)

``log p(x)`` is the model's full discrete log-likelihood (or its bound) in nats, with
dequantization and pre-processing terms already inside (see ``models.core.flow``).
"""
from __future__ import annotations

import math

import torch


def bits_per_dim(log_prob: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Per-example bits/dim from per-example log-likelihoods in nats."""
    return -log_prob.float() / (num_dims * math.log(2.0))


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor."""
    values = values.double()
    n = values.numel()
    stderr = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), stderr
