"""A flow model: one flat sequence of transforms and a base distribution.

    log p(x) = sum_k ldj_k + log p_base(z)

Every likelihood term (dequantization bin volume, -log q(u|x), pre-processing,
split priors) is some transform's ``ldj``, so bits/dim is one function of
``log_prob`` and ``num_dims`` (``engine.metrics.bits_per_dim``).

``forward(x)`` returns ``log_prob(x)``, so a DistributedDataParallel wrapper's forward
really runs the model.  The trainer calls only ``forward`` and the optional hooks
below; it never walks into the layers.

Hooks the trainer looks for (all optional for a model):
    data_init(x)             data-dependent initialisation (ActNorm), same batch on every rank
    after_optimizer_step()   e.g. power iterations of spectral normalisation
    auxiliary_losses()       dict of extra scalar losses from the last forward (e.g. CNF regularisers)
    diagnostics()            dict of scalars to log (NFE, roulette terms, fixed-point iterations)
    find_nonfinite(x)        name of the first layer whose output or ldj is not finite
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.core.distributions import Distribution
from models.core.transform import Transform


class Flow(nn.Module):
    def __init__(self, transforms: list[Transform], base: Distribution, data_shape: tuple[int, int, int]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.base = base
        self.data_shape = tuple(data_shape)
        shape = self.data_shape
        for t in self.transforms:
            shape = t.output_shape(shape)
        if tuple(shape) != tuple(base.shape):
            raise ValueError(f"transforms end in shape {shape} but the base distribution is over {base.shape}")

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)

    # --- density -----------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats, shape (B,), float32 (a lower bound where a layer is a bound)."""
        z, total = x, torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for t in self.transforms:
            z, ldj = t(z, context)
            total = total + ldj
        return total + self.base.log_prob(z)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_prob(x, context)

    @property
    def is_stochastic(self) -> bool:
        """Whether ``log_prob`` draws noise (stochastic dequantization): then it is a
        single-sample bound and ``log_prob_iw`` tightens it."""
        return any(t.stochastic_forward for t in self.transforms)

    @torch.no_grad()
    def log_prob_iw(self, x: torch.Tensor, k: int, chunk: int | None = None,
                    context: torch.Tensor | None = None) -> torch.Tensor:
        """Importance-weighted bound on log P(x) with ``k`` samples, shape (B,), float64:

            log (1/k) sum_i exp(L_i),   L_i = log_prob(x) with independent noise
                                            = log p(x + u_i) - log q(u_i | x) + bin term

        (Burda et al. 2016): k = 1 is the single-sample bound; it rises to log P(x) as k grows.
        ``chunk`` samples go through the model per forward (a batch of B * chunk), so
        any k fits in memory.  Deterministic models return ``log_prob`` (every L_i is equal).
        """
        if k < 1:
            raise ValueError("log_prob_iw needs k >= 1")
        if not self.is_stochastic:
            return self.log_prob(x, context).double()
        chunk = max(1, min(chunk or k, k))
        b = x.shape[0]
        acc = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
        done = 0
        while done < k:
            n = min(chunk, k - done)
            xs = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
            ctx = None if context is None else context.unsqueeze(0).expand(n, *context.shape).reshape(n * b, *context.shape[1:])
            lp = self.log_prob(xs, ctx).double().reshape(n, b)
            acc = torch.logaddexp(acc, torch.logsumexp(lp, dim=0))
            done += n
        return acc - math.log(k)

    # --- sampling -----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n samples; every prior (top and split-off) is sampled at ``temperature``."""
        z = self.base.sample(n, temperature)
        for t in reversed(self.transforms):
            z = t.inverse(z, context, temperature=temperature)
        return z

    # --- exact encode / decode ---------------------------------------------------------
    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """x -> (eps_top, [latents of each factor-out layer]); ``decode`` inverts it."""
        z, latents = x, []
        for t in self.transforms:
            if t.factors_out:
                z, _, latent = t.split(z, context)
                latents.append(latent)
            else:
                z, _ = t(z, context)
        return self.base.standardize(z), latents

    def decode(self, eps_top: torch.Tensor, latents: list[torch.Tensor], context: torch.Tensor | None = None):
        z, latents = self.base.unstandardize(eps_top), list(latents)
        for t in reversed(self.transforms):
            z = t.merge(z, latents.pop(), context) if t.factors_out else t.inverse(z, context)
        return z

    # --- trainer hooks ------------------------------------------------------------------
    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """One forward pass: layers with data-dependent init (ActNorm) initialise on it."""
        self.log_prob(x)

    @torch.no_grad()
    def find_nonfinite(self, x: torch.Tensor) -> str | None:
        """Name of the first transform (or base) with a non-finite parameter, output or ldj."""
        z = x
        for i, t in enumerate(self.transforms):
            name = f"transforms.{i} ({type(t).__name__})"
            if any(not torch.isfinite(p).all() for p in t.parameters()):
                return name + ": non-finite parameter"
            z, ldj = t(z)
            if not torch.isfinite(z).all() or not torch.isfinite(ldj).all():
                return name + ": non-finite output"
        if not torch.isfinite(self.base.log_prob(z)).all():
            return f"base ({type(self.base).__name__})"
        return None
