"""RealNVP's batch-normalization bijector (Dinh, Sohl-Dickstein & Bengio 2017, §3.7).

Per feature (dim 1: channels of an image, coordinates of a vector):

    z = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta
    log|det dz/dx| = sum_features N * (log_gamma - 0.5 log(var + eps))      N = H * W (1 for vectors)

Training mode: mu, var are the batch statistics (biased variance over batch and spatial
positions; gradients flow through them, as in the paper) and the running averages are
updated, ``running <- (1 - momentum) * running + momentum * batch``.  Eval mode: the
running averages are used, so the layer is a fixed affine map of each example.  The
log-determinant uses whichever statistics normalised the batch.  ``inverse`` always uses
the running averages (sampling happens in eval mode; with momentum = 1 they are exactly
the statistics of the last training batch).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, compute_dtype


class BatchNormBijection(Transform):
    def __init__(self, num_features: int, momentum: float = 0.05, eps: float = 1e-4):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @staticmethod
    def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x, context=None):
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            mean = xc.mean(dim=dims)
            var = (xc - self._view(mean, xc)).pow(2).mean(dim=dims)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach().to(self.running_mean.dtype))
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach().to(self.running_var.dtype))
        else:
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        log_gamma, beta = self.log_gamma.to(dtype), self.beta.to(dtype)
        log_std = 0.5 * torch.log(var + self.eps)
        z = (xc - self._view(mean, xc)) * self._view(torch.exp(log_gamma - log_std), xc) + self._view(beta, xc)
        n = x[0, 0].numel()
        ldj = (n * (log_gamma - log_std).sum()).expand(x.shape[0])
        return z.to(x.dtype), ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        dtype = compute_dtype(z)
        zc = z.to(dtype)
        mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        log_std = 0.5 * torch.log(var + self.eps)
        x = (zc - self._view(self.beta.to(dtype), zc)) * self._view(torch.exp(log_std - self.log_gamma.to(dtype)), zc)
        return (x + self._view(mean, zc)).to(z.dtype)
