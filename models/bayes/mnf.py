"""Multiplicative Normalizing Flows (Louizos & Welling 2017, arXiv:1703.01961), dense and conv.

    q(W | z) = prod_ij N(w_ij; z_i mu_ij, sigma_ij^2),   z ~ q(z) (``NoisePosterior``, a flow),
    q(W) = int q(W | z) q(z) dz                      (z on a dense layer's inputs, a conv's outputs)

Forward: one z_b ~ q(z) per example and the local reparameterization given it,

    mean = (x * z_b) mu^T + bias,  var = x^2 (sigma^2)^T,  y = mean + sqrt(var) eps

(conv: mean = z_b * conv(x, mu) + bias, var = conv(x^2, sigma^2)).  KL: q(W) has no closed-form
density, so ``kl()`` is a single-sample unbiased estimate of the upper bound of eq. (13),

    KL(q(W) || p(W)) <= E_{q(z_T) q(W | z_T)} [ KL(q(W | z_T) || p(W)) + log q(z_T) - log r(z_T | W) ]

with r the auxiliary ``ReverseModel`` (equality when r(z | W) is the true posterior q(z | W)).
With an identity flow, r = q and z = 1 it is the mean-field KL of (mu, sigma).
"""
from __future__ import annotations

import torch

from models.bayes.gaussian import kl_to_zero_mean, softplus_std
from models.bayes.mean_field import VAR_FLOOR, MeanFieldLayer
from models.bayes.noise_flow import NoisePosterior, ReverseModel


class MNFLayer(MeanFieldLayer):
    """The mean-field layer's (mu, rho, bias), with q(z) and r(z | W) on top."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | None = None,
                 prior_var: float = 1.0, init_log_var: float = -9.0, steps: int = 2, reverse_steps: int = 2,
                 flow_hidden_channels: int = 50):
        super().__init__(in_features, out_features, kernel_size, prior_var, init_log_var)
        d = self.layout.noise_dim
        self.noise = NoisePosterior(d, steps, flow_hidden_channels, init_log_var)
        self.reverse = ReverseModel(d, reverse_steps, flow_hidden_channels, squash=not self.layout.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.noise.sample(x.shape[0])
        mean = self.layout.noisy_mean(x, z.to(x.dtype), self.weight_mean, self.bias)
        var = self.layout.apply(x * x, self.weight_var)
        return mean + torch.sqrt(var + VAR_FLOOR) * torch.randn_like(mean)

    def sample_weight(self) -> torch.Tensor:
        """One W ~ q(W): z ~ q(z), then W ~ q(W | z)."""
        z, _ = self.noise.sample(1)
        return self.layout.noise_view(z[0]) * self.weight_mean + softplus_std(self.weight_rho) * torch.randn_like(
            self.weight_mean)

    def kl_terms(self, samples: int = 1) -> dict:
        """The bound's three terms, each (samples,): ``conditional`` KL(q(W|z)||p(W)), ``log_q``
        log q(z), ``log_r`` log r(z | W) (W ~ q(W | z) through c^T W)."""
        z, log_q = self.noise.sample(samples)
        var, mean_rows = self.weight_var, self.layout.noise_major(self.weight_mean)
        # KL(N(z_i mu_ij, sigma_ij^2) || N(0, p)) = KL at mean 0 + sum_i z_i^2 sum_j mu_ij^2 / (2 p)
        conditional = kl_to_zero_mean(torch.zeros_like(var), var, self.prior_var) + (
            (z * z) @ (mean_rows * mean_rows).sum(1)) / (2 * self.prior_var)
        mean_a = self.reverse.mean_activation(z, mean_rows, self.layout.noise_major(var))
        return {"conditional": conditional, "log_q": log_q, "log_r": self.reverse.log_prob(z, mean_a)}

    def kl(self, samples: int = 1) -> torch.Tensor:
        """Unbiased estimate (mean over ``samples`` draws) of the KL bound of eq. (13)."""
        t = self.kl_terms(samples)
        return (t["conditional"] + t["log_q"] - t["log_r"]).mean()
