"""The two densities over MNF's multiplicative noise z (Louizos & Welling 2017, arXiv:1703.01961).

NoisePosterior, q(z) (§3.1): a diagonal Gaussian pushed through T masked RealNVP steps
(the affine couplings of ``models.builders.vector_layers``, alternating masks, MLP conditioners
zero-initialised: the flow starts as the identity):

    z_0 ~ N(m, diag exp(l)),   z_T = f_T(... f_1(z_0)),
    log q(z_T) = log N(z_0; m, exp(l)) - sum_t log|det df_t / dz_{t-1}|

(the paper's RealNVP step gates z with a sigmoid; these are the project's affine couplings
z_b = z_b exp(s(z_a)) + t(z_a), the same family of masked bijections.)

ReverseModel, r(z_T | W) (§3.2, the auxiliary model of the bound, eq. 8-12): z_T is mapped by
another T_b masked RealNVP steps to z_b, and

    r(z_T | W) = N(z_b; nu(W), diag exp(lambda(W))) |det dz_b / dz_T|,
    nu = b1 * mean(a),  lambda = b2 * mean(a),   a = psi(c^T W)

with c^T W contracted over the noise axis (``WeightLayout.noise_major``), ψ = tanh for a dense
layer and the identity for a convolution (the authors' code; the paper writes tanh), and W never
drawn: given z, c^T W is Gaussian with mean c^T (z * mu) and variance (c^2)^T sigma^2, sampled by
the local reparameterization.
"""
from __future__ import annotations

import torch
from torch import nn

from models.bayes.gaussian import diag_log_prob
from models.builders.vector_layers import vector_layers
from models.core.compose import Compose


def masked_realnvp(dim: int, steps: int, hidden_channels: int) -> Compose:
    """``steps`` masked RealNVP couplings on vectors of ``dim`` (one hidden layer per conditioner)."""
    return Compose(vector_layers("realnvp", dim, steps, hidden_channels=hidden_channels, hidden_blocks=1))


class NoisePosterior(nn.Module):
    def __init__(self, dim: int, steps: int = 2, hidden_channels: int = 50, init_log_var: float = -9.0):
        super().__init__()
        self.dim = dim
        self.base_mean = nn.Parameter(torch.ones(dim) + 0.01 * torch.randn(dim))
        self.base_log_var = nn.Parameter(torch.full((dim,), float(init_log_var)))
        self.flow = masked_realnvp(dim, steps, hidden_channels)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_T of shape (n, dim), log q(z_T) of shape (n,)), reparameterized."""
        eps = torch.randn(n, self.dim, device=self.base_mean.device, dtype=self.base_mean.dtype)
        z0 = self.base_mean + torch.exp(0.5 * self.base_log_var) * eps
        z, ldj = self.flow(z0)
        return z, diag_log_prob(z0, self.base_mean, self.base_log_var) - ldj

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) at given points (n, dim): z_0 = f^-1(z) through the couplings' inverses."""
        z0 = self.flow.inverse(z)
        _, ldj = self.flow(z0)
        return diag_log_prob(z0, self.base_mean, self.base_log_var) - ldj


class ReverseModel(nn.Module):
    def __init__(self, dim: int, steps: int = 2, hidden_channels: int = 50, squash: bool = True):
        super().__init__()
        self.squash = squash
        self.c = nn.Parameter(torch.randn(dim))
        self.b1 = nn.Parameter(torch.randn(dim))
        self.b2 = nn.Parameter(torch.randn(dim))
        self.flow = masked_realnvp(dim, steps, hidden_channels)

    def mean_activation(self, z: torch.Tensor, mean_rows: torch.Tensor, var_rows: torch.Tensor) -> torch.Tensor:
        """mean(a) with a = psi(c^T W), W ~ q(W | z): ``mean_rows`` / ``var_rows`` are mu and
        sigma^2 as (noise_dim, rest); z of shape (n, noise_dim); returns (n,)."""
        m = (self.c * z) @ mean_rows
        v = (self.c * self.c) @ var_rows
        a = m + torch.sqrt(v) * torch.randn_like(m)
        return (torch.tanh(a) if self.squash else a).mean(-1)

    def log_prob(self, z: torch.Tensor, mean_a: torch.Tensor) -> torch.Tensor:
        """log r(z | W) of z (n, dim) given mean(a) (n,) from ``mean_activation``."""
        zb, ldj = self.flow(z)
        return diag_log_prob(zb, self.b1 * mean_a[:, None], self.b2 * mean_a[:, None]) + ldj
