"""Invertible residual block (Behrmann et al. 2019, i-ResNet; Chen et al. 2019, Residual Flows).

    y = x + g(x),   Lip(g) < 1   (g built from spectrally normalised layers)
    ldj = log det(I + dg/dx)     estimated (``models.transforms.residual.logdet_estimators``)

Estimators (``estimator``):
    "roulette"   unbiased power series: ``n_exact`` terms always (2 in training,
                 ``n_exact_eval`` = 20 in eval mode) plus a Russian-roulette tail with N ~
                 Poisson(lambda) or Geometric(p); Hutchinson probe v ~ N(0, I).
    "truncated"  i-ResNet's biased fixed truncation after ``n_terms`` terms.
    "exact"      brute-force log det of the full Jacobian (small inputs only).
Gradients (training, power-series estimators): ``neumann_grad`` uses the Neumann-series
gradient estimator; ``mem_efficient`` additionally computes it inside the forward pass
(:class:`~models.transforms.residual.logdet_estimators.MemoryEfficientLogDet`).
Without ``neumann_grad`` the gradient backpropagates through every term of the series.

Inverse (i-ResNet Alg. 1): the fixed point x = y - g(x), a contraction with constant
Lip(g) < 1:  x_0 = y,  x_{i+1} = y - g(x_i), until max |x_{i+1} - x_i| <= atol + rtol |y|
elementwise or ``inverse_max_iters``.  The iterations used and the last step
max |x_k - x_{k-1}| of the last inverse are kept for diagnostics (plain attributes, never
read by ``forward``); the error of the returned x is at most Lip(g) / (1 - Lip(g)) times
that step and its residual |x + g(x) - y| at most Lip(g) times it, so no extra evaluation
of g is spent on measuring it.

Hooks (``models.core.transform``): ``data_init`` runs the power iterations of every
spectrally normalised layer of ``net`` to tolerance before training, ``after_optimizer_step``
refines them after every step (``models.nets.lipschitz``; all blocks of a model in step, through
``after_optimizer_step_all``: one host read per round), and ``diagnostics`` reports the
series terms of the last forward, the fixed-point iterations and last step of the last
inverse, the power iterations and the largest sigma / coeff of its layers.

The block's arithmetic runs in at least float32 with autocast off (the invertible stream
convention).  The probe and N come from torch's global RNG: no estimator state on the module.
"""
from __future__ import annotations

import torch

from models.core.transform import Transform, compute_dtype
from models.nets.lipschitz import SpectralNormBase, power_iterate
from models.transforms.residual.logdet_estimators import (
    DISTRIBUTIONS,
    MemoryEfficientLogDet,
    exact_logdet,
    power_series_logdet,
    roulette_weights,
    sample_roulette,
)

ESTIMATORS = ("roulette", "truncated", "exact")


class InvertibleResidualBlock(Transform):
    exact_inverse = False

    def __init__(self, net: torch.nn.Module, estimator: str = "roulette", dist: str = "poisson",
                 poisson_lambda: float = 2.0, geometric_p: float = 0.5, n_exact: int = 2, n_exact_eval: int = 20,
                 n_terms: int = 5, neumann_grad: bool = True, mem_efficient: bool = True,
                 inverse_atol: float = 1e-5, inverse_rtol: float = 1e-5, inverse_max_iters: int = 100):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"roulette distribution must be one of {DISTRIBUTIONS}, got {dist!r}")
        self.net = net
        self.estimator, self.dist = estimator, dist
        self.dist_param = float(poisson_lambda if dist == "poisson" else geometric_p)
        self.n_exact, self.n_exact_eval, self.n_terms = int(n_exact), int(n_exact_eval), int(n_terms)
        self.neumann_grad, self.mem_efficient = bool(neumann_grad), bool(mem_efficient)
        self.inverse_atol, self.inverse_rtol = float(inverse_atol), float(inverse_rtol)
        self.inverse_max_iters = int(inverse_max_iters)
        self.exact_ldj = estimator == "exact"  # instance flag: the power series is an estimate
        # diagnostics of the last call (plain attributes; forward never reads them)
        self.last_terms = 0
        self.last_inverse_iters = 0
        self.last_inverse_step = 0.0

    # --- hooks ---------------------------------------------------------------------------
    def spectral_norm_layers(self) -> list[SpectralNormBase]:
        return [m for m in self.net.modules() if isinstance(m, SpectralNormBase)]

    @torch.no_grad()
    def data_init(self) -> None:
        """Converge every power iteration (to tolerance or its max_iters)."""
        self.after_optimizer_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        power_iterate(self.spectral_norm_layers())

    @classmethod
    def after_optimizer_step_all(cls, layers: list["InvertibleResidualBlock"]) -> None:
        """The power iterations of every block's layers in step: one host read per round for
        all of them (``models.nets.lipschitz.power_iterate``), not one per layer."""
        power_iterate([m for block in layers for m in block.spectral_norm_layers()])  # (under no_grad)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        out = {"series_terms": self.last_terms, "inverse_iters": self.last_inverse_iters,
               "inverse_step": self.last_inverse_step}
        sn = self.spectral_norm_layers()
        if sn:
            out["power_iters"] = max(m.last_iters for m in sn)
            out["sigma_over_coeff"] = max(float(m.sigma().detach()) / m.coeff for m in sn)
        return out

    # --- the series -----------------------------------------------------------------------
    def series_weights(self) -> list[float]:
        """Weights w_0..w_n of this call's series: draws N for the roulette (torch RNG)."""
        if self.estimator == "truncated":
            return [1.0] * (self.n_terms + 1)
        n_exact = self.n_exact if self.training else self.n_exact_eval
        return roulette_weights(n_exact, sample_roulette(self.dist, self.dist_param), self.dist, self.dist_param)

    # Under ``train.compile`` the block runs eagerly (one graph break on each side): the log-det
    # estimators differentiate g's vector-Jacobian products again (the Neumann surrogate's
    # ``create_graph``, the memory-efficient backward-in-forward, backprop through the series),
    # and AOTAutograd's compiled graphs support no double backward.  The layers around the
    # blocks (ActNorm, squeezes, the logit transform, the prior) are still compiled.  forward_aux
    # is disabled too: else Dynamo resumes in the shared Transform.forward_aux frame after every
    # block, guarding on the block's type, and past its recompile limit the layers after run eagerly.
    @torch.compiler.disable
    def forward_aux(self, x, context=None):
        return super().forward_aux(x, context)

    @torch.compiler.disable
    def forward(self, x, context=None):
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            need_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            if self.estimator == "exact":
                with torch.enable_grad():
                    xg = x if x.requires_grad else x.detach().requires_grad_(True)
                    g = self.net(xg)
                    ldj = exact_logdet(g, xg, create_graph=need_grad)
                self.last_terms = 0
                if not need_grad:
                    g, ldj = g.detach(), ldj.detach()
                return x + g, ldj
            weights = self.series_weights()
            self.last_terms = len(weights) - 1
            v = torch.randn_like(x)
            if need_grad and self.neumann_grad and self.mem_efficient:
                params = [p for p in self.net.parameters() if p.requires_grad]
                g, ldj = MemoryEfficientLogDet.apply(x, v, self.net, weights, *params)
                return x + g, ldj
            with torch.enable_grad():
                xg = x if x.requires_grad else x.detach().requires_grad_(True)
                g = self.net(xg)
                est, surrogate = power_series_logdet(g, xg, v, weights, neumann=self.neumann_grad, need_grad=need_grad)
            if not need_grad:
                return (x + g).detach(), est.detach()
            ldj = est if surrogate is None else est + (surrogate - surrogate.detach())
            return x + g, ldj

    @torch.no_grad()
    def inverse(self, z, context=None, *, temperature=1.0):
        dtype = compute_dtype(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            y = z.to(dtype)
            tol = self.inverse_atol + self.inverse_rtol * y.abs()
            x, it = y, 0
            step = torch.zeros(())
            for it in range(1, self.inverse_max_iters + 1):
                x_new = y - self.net(x)
                step = (x_new - x).abs()
                done = bool((step <= tol).all())
                x = x_new
                if done:
                    break
            self.last_inverse_iters = it
            self.last_inverse_step = float(step.max()) if step.numel() else 0.0
        return x.to(z.dtype)

    def extra_repr(self):
        return (f"estimator={self.estimator}, dist={self.dist}({self.dist_param}), n_exact={self.n_exact}/"
                f"{self.n_exact_eval}, n_terms={self.n_terms}, neumann_grad={self.neumann_grad}, "
                f"mem_efficient={self.mem_efficient}")
