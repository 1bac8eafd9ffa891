"""Diagonal Gaussian pieces shared by the Bayesian layers.

    KL(N(m, v) || N(0, p)) = 1/2 sum [ v / p + m^2 / p - 1 - log(v / p) ]
    log N(x; m, exp(l)) = sum [ -1/2 log 2 pi - l / 2 - (x - m)^2 exp(-l) / 2 ]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def kl_to_zero_mean(mean: torch.Tensor, var: torch.Tensor, prior_var: float) -> torch.Tensor:
    """KL(N(mean, var) || N(0, prior_var)) summed over all entries (a scalar)."""
    ratio = var / prior_var
    return 0.5 * (ratio + mean * mean / prior_var - 1.0 - torch.log(ratio)).sum()


def diag_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag exp(log_var)) summed over the last dimension."""
    return (-0.5 * LOG_2PI - 0.5 * log_var - 0.5 * (x - mean) ** 2 * torch.exp(-log_var)).sum(-1)


def softplus_std(rho: torch.Tensor) -> torch.Tensor:
    """sigma = log(1 + exp(rho)) (Blundell et al. 2015 §3.2): positive for any rho."""
    return F.softplus(rho)


def rho_for_log_var(log_var: float) -> float:
    """The rho whose softplus is exp(log_var / 2)."""
    sigma = math.exp(0.5 * log_var)
    return math.log(math.expm1(sigma))
