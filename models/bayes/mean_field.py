"""Mean-field Gaussian weights with local reparameterization (Blundell et al. 2015,
"Weight Uncertainty in Neural Networks", arXiv:1505.05424 §3; the local reparameterization of
Kingma, Salimans & Welling 2015, arXiv:1506.02557 §2.3).

    q(W) = prod_ij N(w_ij; mu_ij, sigma_ij^2),  sigma = softplus(rho),  p(W) = N(0, prior_var I)
    pre-activation b = x W^T + bias is Gaussian given x:
        mean = x mu^T + bias,   var = x^2 (sigma^2)^T,   b = mean + sqrt(var) * eps,  eps ~ N(0, I)
    (dense; a convolution likewise with conv(x, mu), conv(x^2, sigma^2)), one draw per example
    KL(q(W) || p(W)) in closed form (``gaussian.kl_to_zero_mean``)

Biases are point estimates (no KL term), in this layer and in MNF's.
"""
from __future__ import annotations

import torch
from torch import nn

from models.bayes.gaussian import kl_to_zero_mean, rho_for_log_var, softplus_std
from models.bayes.weights import WeightLayout

VAR_FLOOR = 1e-8  # keeps sqrt(var) differentiable where an input is all zeros


class MeanFieldLayer(nn.Module):
    stochastic = True

    def __init__(self, in_features: int, out_features: int, kernel_size: int | None = None,
                 prior_var: float = 1.0, init_log_var: float = -9.0):
        super().__init__()
        self.layout = WeightLayout(in_features, out_features, kernel_size)
        self.prior_var = prior_var
        self.weight_mean = self.layout.init_mean()
        self.weight_rho = nn.Parameter(torch.full(self.layout.shape, rho_for_log_var(init_log_var)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @property
    def weight_var(self) -> torch.Tensor:
        return softplus_std(self.weight_rho) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.layout.apply(x, self.weight_mean, self.bias)
        var = self.layout.apply(x * x, self.weight_var)
        return mean + torch.sqrt(var + VAR_FLOOR) * torch.randn_like(mean)

    def sample_weight(self) -> torch.Tensor:
        """One W ~ q(W) (what the local reparameterization avoids drawing; tests compare the two)."""
        return self.weight_mean + softplus_std(self.weight_rho) * torch.randn_like(self.weight_mean)

    def kl(self) -> torch.Tensor:
        return kl_to_zero_mean(self.weight_mean, self.weight_var, self.prior_var)
