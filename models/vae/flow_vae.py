"""VAE with a flow posterior (Rezende & Mohamed 2015, §4.2 and §6.2).

    q_0(z0 | x) = N(mu(x), diag sigma(x)^2)        z_K = f_K(...f_1(z0)),  f_k = transform k's forward
    log q_K(z_K | x) = log q_0(z0 | x) - sum_k log|det df_k/dz_{k-1}|
    -ELBO(x) = E_q[ log q_K(z_K | x) - log p(z_K) - log p(x | z_K) ]          p(z) = N(0, I)
    log p(x) ~ log (1/S) sum_s p(x, z_s) / q_K(z_s | x),   z_s ~ q_K   (importance sampling)

The importance-sampled estimate is a lower bound on log p(x) whose expectation rises
with S (Burda et al. 2016); S = 1 is the ELBO.  Both are reported in nats as
-log p(x) (upper bounds).

Posterior flows (``flow``): "planar" and "radial" with parameters amortised from the
encoder's last hidden layer (as Rezende & Mohamed), "iaf" (MADE steps whose one-pass
direction is the posterior step z_k = (z_{k-1} - mu(z_{k-1})) exp(-alpha(z_{k-1})),
conditioned on the encoder's hidden layer; orderings alternate), and "sylvester"
(orthogonal Sylvester steps with parameters shared over examples, not amortised as in
van den Berg et al.).  K = 0 is the diagonal Gaussian.

Encoder and decoder are MLPs (x_dim -> hidden -> hidden), the likelihood Bernoulli.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.core.compose import Compose
from models.core.distributions import LOG_2PI
from models.nets.made import MADE
from models.transforms.vector.maf import MAF
from models.transforms.vector.planar import PlanarFlow
from models.transforms.vector.radial import RadialFlow
from models.transforms.vector.sylvester import SylvesterFlow

FLOWS = ("planar", "radial", "iaf", "sylvester")


def binarize(images: torch.Tensor) -> torch.Tensor:
    """Fixed binarization: pixel / 255 > 0.5 (no sampling), flattened to (N, C*H*W) float."""
    return (images.reshape(images.shape[0], -1).float() > 127.5).float()


def load_binarized_fashion_mnist(max_train: int | None = None, max_test: int | None = None):
    from data import load_dataset

    ds = load_dataset("fashion_mnist", download=False, max_train=max_train, max_test=max_test)
    return binarize(ds.train), binarize(ds.test), ds.source


def _std_normal_log_prob(z):
    return (-0.5 * LOG_2PI - 0.5 * z * z).sum(dim=1)


class FlowVAE(nn.Module):
    def __init__(self, x_dim: int = 784, z_dim: int = 40, hidden: int = 300, flow: str = "planar", num_flows: int = 0):
        super().__init__()
        if flow not in FLOWS:
            raise ValueError(f"unknown posterior flow {flow!r}; known: {', '.join(FLOWS)}")
        self.z_dim, self.flow_name, self.num_flows = z_dim, flow, num_flows
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.enc_out = nn.Linear(hidden, 2 * z_dim)
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, x_dim))
        flows = []
        for k in range(num_flows):
            if flow == "planar":
                flows.append(PlanarFlow(z_dim, context_features=hidden))
            elif flow == "radial":
                flows.append(RadialFlow(z_dim, context_features=hidden))
            elif flow == "iaf":
                made = MADE(z_dim, (hidden, hidden), ordering="natural" if k % 2 == 0 else "reverse",
                            context_features=hidden)
                flows.append(MAF(made))
            else:
                flows.append(SylvesterFlow(z_dim, "orthogonal", num_ortho_vecs=min(8, z_dim)))
        self.flows = Compose(flows)

    def posterior(self, x: torch.Tensor, samples: int = 1):
        """z_K of shape (S, B, Z) and log q_K(z_K | x) of shape (S, B)."""
        h = self.encoder(x)
        mu, log_std = self.enc_out(h).chunk(2, dim=1)
        b = x.shape[0]
        eps = torch.randn(samples, b, self.z_dim, device=x.device, dtype=mu.dtype)
        z = (mu + torch.exp(log_std) * eps).reshape(samples * b, self.z_dim)
        log_q = (-0.5 * LOG_2PI - log_std - 0.5 * eps * eps).sum(dim=2).reshape(samples * b)
        z, ldj = self.flows(z, h.repeat(samples, 1))
        log_q = log_q - ldj
        return z.reshape(samples, b, self.z_dim), log_q.reshape(samples, b)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) (Bernoulli) for z of shape (S, B, Z): (S, B)."""
        logits = self.decoder(z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(dim=-1)

    def elbo_terms(self, x: torch.Tensor, samples: int = 1):
        """(log p(x|z), log p(z) - log q(z|x)) per sample, each (S, B)."""
        z, log_q = self.posterior(x, samples)
        return self.log_likelihood(x, z), _std_normal_log_prob(z.reshape(-1, self.z_dim)).reshape(log_q.shape) - log_q

    def loss(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Mean over the batch of -(E log p(x|z) + beta * E[log p(z) - log q(z|x)]), one sample."""
        rec, kl_term = self.elbo_terms(x, 1)
        return -(rec + beta * kl_term).mean()

    @torch.no_grad()
    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """ELBO per example (B,), one posterior sample."""
        rec, kl_term = self.elbo_terms(x, 1)
        return (rec + kl_term)[0]

    @torch.no_grad()
    def importance_log_px(self, x: torch.Tensor, samples: int = 5000, chunk: int = 500) -> torch.Tensor:
        """log (1/S) sum_s p(x, z_s) / q(z_s | x) per example (B,), with z_s ~ q_K(.|x)."""
        parts = []
        left = samples
        while left > 0:
            s = min(chunk, left)
            rec, kl_term = self.elbo_terms(x, s)
            parts.append(rec + kl_term)
            left -= s
        log_w = torch.cat(parts, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(samples)
