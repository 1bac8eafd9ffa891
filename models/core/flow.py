"""A flow model: one chain of transforms and a base distribution.

    log p(x) = sum_k ldj_k + log p_base(z)

Every likelihood term (dequantization bin volume, -log q(u|x), pre-processing,
split priors) is some transform's ``ldj``, so bits/dim is one function of
``log_prob`` and ``num_dims`` (``engine.metrics.bits_per_dim``).

``forward(x)`` returns ``log_prob(x)`` (with ``return_aux=True`` also the auxiliary
losses of that very forward), so a DistributedDataParallel wrapper's forward really
runs the model.  The trainer calls ``forward`` and the hooks below unconditionally
(``models.core.hooks.LayerHooks``, shared with models that are not flows); each hook
gathers the layers' own hooks (``models.core.transform``) over every ``Transform`` among
the modules, nested ones included, names prefixed with the layer's path (e.g.
``transforms.3.nfe_forward``):

    data_init(x)             layers' ``data_init()``, then one forward for data-dependent
                             init (skipped when no layer needs it); same batch on every rank
    after_optimizer_step()   e.g. power iterations of spectral normalisation
    diagnostics()            {name: float}: NFE, roulette terms, fixed-point iterations
    diagnostics_summary()    the same, summed and maximised over layers (what is logged every step)
    layer_stats(x)           per-layer log-det and output statistics of one batch
    find_nonfinite(x)        name of the first layer whose output or ldj is not finite

What the per-image number is, asked in one place: ``is_stochastic`` (a layer draws
noise: a single-sample bound), ``is_exact`` (every log-det exact, no noise),
``is_discrete`` (integers to integers: an exact discrete log P(x), a code length), and
``likelihood_kind`` combining them.

The push-forward view (reverse KL, variational inference; Rezende & Mohamed 2015,
arXiv:1505.05770 §3-4) uses the layers' ``forward`` as the sampling map from the base:

    x = T(z0),  z0 ~ p_base,        log q(x) = log p_base(z0) - sum_k ldj_k(z_{k-1})

``push_forward(z0)`` gives (x, log q(x)) with gradients (also as ``model(z0, as_sampler=True)``,
so a DistributedDataParallel wrapper runs it), ``push_forward_log_prob(x)`` the density
of those samples at given points (z0 found through the layers' inverses).

The model's own sampler (``sample``: the layers' inverses) with its density, with gradients,
is ``sample_with_log_prob(z0)`` (also ``model(z0, as_sampler="inverse")``):

    x = T^-1(z0),   log p(x) = log p_base(z0) - sum_k log|det dx_k/dz_k|  (= log_prob(x))

one MADE pass per IAF layer (density distillation, arXiv:1711.10433 §3).
"""
from __future__ import annotations

import math

import torch

from models.core.compose import Compose
from models.core.distributions import Distribution
from models.core.hooks import LayerHooks
from models.core.transform import Transform


class Flow(LayerHooks):
    def __init__(self, transforms: list[Transform], base: Distribution, data_shape: tuple[int, ...]):
        super().__init__()
        self.transforms = transforms if isinstance(transforms, Compose) else Compose(transforms)
        self.base = base
        self.data_shape = tuple(data_shape)
        shape = self.transforms.output_shape(self.data_shape)
        if tuple(shape) != tuple(base.shape):
            raise ValueError(f"transforms end in shape {shape} but the base distribution is over {base.shape}")

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)

    # --- density -----------------------------------------------------------------
    def log_prob_aux(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """(log p(x) of shape (B,), float32; auxiliary losses of this forward, names prefixed)."""
        z, ldj, aux = self.transforms.forward_aux(x, context)
        log_p = ldj.to(torch.promote_types(ldj.dtype, torch.float32)) + self.base.log_prob(z)
        return log_p, {f"transforms.{k}": v for k, v in aux.items()}

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats, shape (B,), float32 (a lower bound where a layer is a bound)."""
        z, ldj = self.transforms(x, context)
        return ldj.to(torch.promote_types(ldj.dtype, torch.float32)) + self.base.log_prob(z)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_aux: bool = False,
                as_sampler: bool = False):
        """``log_prob(x)`` (with ``return_aux``: and the auxiliary losses); with ``as_sampler``,
        ``x`` is base noise z0 and the result ``push_forward(z0)`` (``as_sampler="inverse"``:
        ``sample_with_log_prob(z0)``)."""
        if as_sampler == "inverse":
            return self.sample_with_log_prob(x, context)
        if as_sampler:
            return self.push_forward(x, context)
        return self.log_prob_aux(x, context) if return_aux else self.log_prob(x, context)

    # --- the push-forward (sampler) view ----------------------------------------------------
    def push_forward(self, z0: torch.Tensor, context: torch.Tensor | None = None):
        """(x, log q(x)) with x = T(z0) through the layers' forwards and
        log q(x) = log p_base(z0) - sum_k ldj_k, both with gradients (reverse KL)."""
        x, ldj = self.transforms(z0, context)
        return x, self.base.log_prob(z0) - ldj.to(torch.promote_types(ldj.dtype, torch.float32))

    @torch.no_grad()
    def push_forward_log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log q(x) of ``push_forward``'s samples at the points ``x``: z0 = T^-1(x) through the
        layers' inverses, then log p_base(z0) - sum_k ldj_k."""
        return self.push_forward(self.transforms.inverse(x, context), context)[1]

    def sample_with_log_prob(self, z0: torch.Tensor, context: torch.Tensor | None = None):
        """(x, log p(x)) of the model's own sampler, both with gradients: x = T^-1(z0) through
        the layers' ``inverse_with_ldj`` (``sample`` at temperature 1) and
        log p(x) = log p_base(z0) - sum_k log|det dx/dz|_k, equal to ``log_prob(x)``."""
        x, ldj = self.transforms.inverse_with_ldj(z0, context)
        return x, self.base.log_prob(z0) - ldj.to(torch.promote_types(ldj.dtype, torch.float32))

    # --- what the number is ------------------------------------------------------------
    @property
    def is_stochastic(self) -> bool:
        """Whether ``log_prob`` draws noise (stochastic dequantization, argmax): then it is a
        single-sample bound and ``log_prob_iw`` tightens it."""
        return any(t.stochastic_forward for _, t in self.layers())

    @property
    def is_exact(self) -> bool:
        """Every log-det is exact and nothing is sampled: log_prob is log p(x) itself."""
        return not self.is_stochastic and all(t.exact_ldj for _, t in self.layers())

    @property
    def is_discrete(self) -> bool:
        """Integers to integers all the way (IDF): log_prob is an exact discrete log P(x)."""
        layers = self.layers()
        return bool(layers) and all(t.discrete for _, t in layers) and getattr(self.base, "discrete", False)

    @property
    def likelihood_kind(self) -> str:
        """"bound" (a layer draws noise), "estimated" (a log-det is estimated: Russian
        roulette, Hutchinson) or "exact"."""
        if self.is_stochastic:
            return "bound"
        return "exact" if self.is_exact else "estimated"

    @torch.no_grad()
    def log_prob_iw(self, x: torch.Tensor, k: int, chunk: int | None = None,
                    context: torch.Tensor | None = None) -> torch.Tensor:
        """Importance-weighted bound on log P(x) with ``k`` samples, shape (B,), float64:

            log (1/k) sum_i exp(L_i),   L_i = log_prob(x) with independent noise
                                            = log p(x + u_i) - log q(u_i | x) + bin term

        (Burda et al. 2016, arXiv:1509.00519): k = 1 is the single-sample bound; it rises to
        log P(x) as k grows.  ``chunk`` samples go through the model per forward (a batch of
        B * chunk), so any k fits in memory.  Deterministic models return ``log_prob``.
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
        return self.transforms.inverse(self.base.sample(n, temperature), context, temperature=temperature)

    # --- exact encode / decode ---------------------------------------------------------
    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None, on_split=None):
        """x -> (eps_top, [latent of each factor-out layer]); ``decode`` inverts it.
        ``on_split(layer, kept, latent)`` is called at each factor-out layer."""
        z, _, latents = self.transforms.split(x, context, on_split)
        return self.base.standardize(z), latents

    def decode(self, eps_top: torch.Tensor, latents, context: torch.Tensor | None = None):
        """Inverse of ``encode``; ``latents`` a list, or ``latents(layer, kept) -> latent``
        asked at each factor-out layer from the top down (entropy decoding)."""
        return self.transforms.merge(self.base.unstandardize(eps_top), latents, context)

    def factor_out_layers(self) -> list[Transform]:
        return self.transforms.factor_out_layers()

    # --- trainer hooks ------------------------------------------------------------------
    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Every layer's ``data_init()``, then one forward pass on ``x`` if a layer
        initialises from data (ActNorm)."""
        super().data_init(x)
        if any(getattr(m, "needs_data_init", False) for m in self.modules()):  # layers and net layers (ActNorm2d)
            self.log_prob(x)

    @torch.no_grad()
    def layer_stats(self, x: torch.Tensor, context: torch.Tensor | None = None) -> dict[str, float]:
        """Per top-level layer on the batch ``x``: the mean and std over examples of its
        log-det (per dimension of the data) and the RMS and max |.| of its output."""
        out, z = {}, x
        for i, t in enumerate(self.transforms):
            z, ldj = t(z, context)
            zf, lf = z.detach().float(), ldj.detach().float() / self.num_dims
            name = f"transforms.{i}.{type(t).__name__}"
            out[f"{name}/ldj_mean"] = float(lf.mean())
            out[f"{name}/ldj_std"] = float(lf.std()) if lf.numel() > 1 else 0.0
            out[f"{name}/out_rms"] = float(zf.pow(2).mean().sqrt())
            out[f"{name}/out_absmax"] = float(zf.abs().max()) if zf.numel() else 0.0
        return out

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
