"""VAE with a flow posterior (Rezende & Mohamed 2015, arXiv:1505.05770 §4.2 and §6.2).

    q_0(z0 | x) = N(mu(x), diag sigma(x)^2)        z_K = f_K(...f_1(z0)),  f_k = transform k's forward
    log q_K(z_K | x) = log q_0(z0 | x) - sum_k log|det df_k/dz_{k-1}|
    -ELBO(x) = E_q[ log q_K(z_K | x) - log p(z_K) - log p(x | z_K) ]          p(z) = N(0, I)
    log p(x) ~ log (1/S) sum_s p(x, z_s) / q_K(z_s | x),   z_s ~ q_K   (importance sampling)

The importance-sampled estimate is a lower bound on log p(x) whose expectation rises
with S (Burda et al. 2016, arXiv:1509.00519); S = 1 is the ELBO.  Both are reported in
nats as -log p(x) (upper bounds).

Posterior flows (``flow``, K = ``num_flows`` layers from ``models.builders.vector_layers``):
"planar" and "radial" with parameters amortised from the encoder's last hidden layer (as
Rezende & Mohamed), "iaf" (MADE steps whose one-pass direction is the posterior step
z_k = (z_{k-1} - mu(z_{k-1})) exp(-alpha(z_{k-1})), i.e. the builder's ``maf`` layers used as
the sampling map, conditioned on the encoder's hidden layer; orderings alternate), and
"sylvester" (Sylvester steps of ``kind``, orthogonal with ``ortho_vectors`` columns by
default, parameters shared over examples, not amortised as in van den Berg et al.).
K = 0 is the diagonal Gaussian.

Encoder and decoder are MLPs (x_dim -> hidden -> hidden), the likelihood Bernoulli on
binary data: images with ``data.n_bits=1`` (pixel >= 128), flattened here.  The model loads
no data; ``forward(x)`` gives the ELBO's two terms (``engine.objectives.NegativeELBO``), and
the trainer's hooks come from ``models.core.hooks.LayerHooks`` (over the posterior layers).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.builders.vector_layers import vector_layers
from models.core.compose import Compose
from models.core.distributions import LOG_2PI
from models.core.hooks import LayerHooks

FLOWS = ("planar", "radial", "iaf", "sylvester")


def _std_normal_log_prob(z):
    return (-0.5 * LOG_2PI - 0.5 * z * z).sum(dim=1)


class FlowVAE(LayerHooks):
    def __init__(self, x_dim: int = 784, z_dim: int = 40, hidden: int = 300, flow: str = "planar", num_flows: int = 0,
                 data_shape: tuple[int, ...] | None = None, kind: str = "orthogonal", ortho_vectors: int = 8):
        super().__init__()
        if flow not in FLOWS:
            raise ValueError(f"unknown posterior flow {flow!r}; known: {', '.join(FLOWS)}")
        self.z_dim, self.flow_name, self.num_flows = z_dim, flow, num_flows
        self.data_shape = tuple(data_shape) if data_shape is not None else (x_dim,)
        if math.prod(self.data_shape) != x_dim:
            raise ValueError(f"data_shape {self.data_shape} does not hold x_dim = {x_dim} values")
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.enc_out = nn.Linear(hidden, 2 * z_dim)
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, x_dim))
        layers = vector_layers("maf" if flow == "iaf" else flow, z_dim, num_flows, hidden_channels=hidden,
                               hidden_blocks=2, kind=kind, ortho_vectors=min(ortho_vectors, z_dim),
                               context_features=None if flow == "sylvester" else hidden, planar_init_scale=0.1)
        self.flows = Compose(layers)

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """Binary images (B, C, H, W) of any dtype -> float (B, C*H*W)."""
        return x.reshape(x.shape[0], -1).to(self.enc_out.weight.dtype)

    def posterior(self, x: torch.Tensor, samples: int = 1):
        """z_K of shape (S, B, Z) and log q_K(z_K | x) of shape (S, B)."""
        x = self._flat(x)
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
        x = self._flat(x)
        logits = self.decoder(z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(dim=-1)

    def elbo_terms(self, x: torch.Tensor, samples: int = 1):
        """(log p(x|z), log p(z) - log q(z|x)) per sample, each (S, B)."""
        z, log_q = self.posterior(x, samples)
        return self.log_likelihood(x, z), _std_normal_log_prob(z.reshape(-1, self.z_dim)).reshape(log_q.shape) - log_q

    def forward(self, x: torch.Tensor, samples: int = 1):
        """The ELBO's terms ``elbo_terms(x, samples)`` (what the trainer's objective calls)."""
        return self.elbo_terms(x, samples)

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

    # --- samples ----------------------------------------------------------------------
    @torch.no_grad()
    def sample_means(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Bernoulli means p(x = 1 | z), z ~ N(0, T^2 I), shaped as the data (n, *data_shape)."""
        z = temperature * torch.randn(n, self.z_dim, device=self.enc_out.weight.device)
        return torch.sigmoid(self.decoder(z)).reshape(n, *self.data_shape)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Binary images x ~ p(x | z), z ~ N(0, T^2 I), shaped as the data."""
        return torch.bernoulli(self.sample_means(n, temperature))

    # --- trainer hooks (the rest: LayerHooks) --------------------------------------------
    @torch.no_grad()
    def layer_stats(self, x: torch.Tensor) -> dict[str, float]:
        """Per posterior layer on one draw z0 ~ q_0(.|x): mean and std over examples of its
        log-det and the RMS and max |.| of its output; and the mean posterior std of q_0."""
        h = self.encoder(self._flat(x))
        mu, log_std = self.enc_out(h).chunk(2, dim=1)
        z = mu + torch.exp(log_std) * torch.randn_like(mu)
        out = {"q0/std_mean": float(torch.exp(log_std).mean())}
        for i, t in enumerate(self.flows):
            z, ldj = t(z, h)
            name = f"flows.{i}.{type(t).__name__}"
            out[f"{name}/ldj_mean"] = float(ldj.float().mean())
            out[f"{name}/ldj_std"] = float(ldj.float().std()) if ldj.numel() > 1 else 0.0
            out[f"{name}/out_rms"] = float(z.float().pow(2).mean().sqrt())
            out[f"{name}/out_absmax"] = float(z.float().abs().max()) if z.numel() else 0.0
        return out

    @torch.no_grad()
    def find_nonfinite(self, x: torch.Tensor) -> str | None:
        """The first non-finite parameter, else the first module (encoder, posterior layer,
        decoder) whose output on ``x`` is not finite, or None."""
        bad = super().find_nonfinite(x)
        if bad is not None:
            return bad
        h = self.encoder(self._flat(x))
        stats = self.enc_out(h)
        if not torch.isfinite(h).all() or not torch.isfinite(stats).all():
            return "encoder: non-finite output"
        mu, log_std = stats.chunk(2, dim=1)
        z = mu + torch.exp(log_std) * torch.randn_like(mu)
        for i, t in enumerate(self.flows):
            z, ldj = t(z, h)
            if not torch.isfinite(z).all() or not torch.isfinite(ldj).all():
                return f"flows.{i} ({type(t).__name__}): non-finite output"
        if not torch.isfinite(self.decoder(z)).all():
            return "decoder: non-finite output"
        return None
