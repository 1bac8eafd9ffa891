"""Discretized logistic (mixture) distributions over the integers (IDF §3.2; PixelCNN++).

One component with mean mu and scale s puts on the integer k the mass of [k - 1/2, k + 1/2):

    P(k) = sigma((k + 1/2 - mu) / s) - sigma((k - 1/2 - mu) / s)
         = sigma(b) sigma(-a) (1 - exp(-1/s))           a, b = (k -/+ 1/2 - mu) / s

(the product form is stable in both tails).  Over all integers the masses sum to 1, so
latents that leave the pixel range need no special case.  A mixture is
P(k) = sum_j pi_j P_j(k).  For entropy coding on a finite alphabet {lo, ..., hi}
``interval_probs`` folds the two tails into the edge bins (P(lo) = F(lo + 1/2),
P(hi) = 1 - F(hi - 1/2)), which never gives an in-range symbol less mass than ``log_prob``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class DiscretizedLogisticMixture:
    """Per-element mixtures: ``means``, ``log_scales``, ``logits`` of shape (..., K), in integer units."""

    def __init__(self, means: torch.Tensor, log_scales: torch.Tensor, logits: torch.Tensor | None = None):
        self.means, self.log_scales = means, log_scales
        self.log_weights = torch.zeros_like(means) if logits is None else F.log_softmax(logits, dim=-1)

    @property
    def shape(self) -> torch.Size:
        return self.means.shape[:-1]

    def log_prob(self, k: torch.Tensor) -> torch.Tensor:
        """Elementwise log P(k) in nats for integer-valued ``k`` of shape ``self.shape``."""
        k = k.to(self.means.dtype).unsqueeze(-1)
        inv_s = torch.exp(-self.log_scales)
        a, b = (k - 0.5 - self.means) * inv_s, (k + 0.5 - self.means) * inv_s
        log_p = F.logsigmoid(b) + F.logsigmoid(-a) + _log1mexp(-inv_s)
        return torch.logsumexp(self.log_weights + log_p, dim=-1)

    def interval_probs(self, lo: int, hi: int) -> torch.Tensor:
        """P over the symbols lo..hi with the tails folded into the edges: shape (..., hi - lo + 1).

        Differences of the CDF F at the W + 1 bin edges (with F = 0 below lo, 1 above hi):
        one sigmoid per edge, exact to float rounding (absolute error ~1e-16 in float64).
        """
        edges = torch.arange(lo - 0.5, hi + 1.0, 1.0, dtype=self.means.dtype, device=self.means.device)
        edges = edges.reshape(*([1] * len(self.shape)), -1, 1)  # (..., W + 1, 1) against (..., 1, K)
        cdf = torch.sigmoid((edges - self.means.unsqueeze(-2)) * torch.exp(-self.log_scales.unsqueeze(-2)))
        cdf[..., 0, :], cdf[..., -1, :] = 0.0, 1.0
        return (torch.diff(cdf, dim=-2) * torch.exp(self.log_weights).unsqueeze(-2)).sum(dim=-1)

    def _map(self, fn) -> "DiscretizedLogisticMixture":
        out = DiscretizedLogisticMixture.__new__(DiscretizedLogisticMixture)
        out.means, out.log_scales, out.log_weights = fn(self.means), fn(self.log_scales), fn(self.log_weights)
        return out

    def flatten(self) -> "DiscretizedLogisticMixture":
        """The same mixtures as a 1-D batch (row-major over ``self.shape``)."""
        return self._map(lambda p: p.reshape(-1, p.shape[-1]))

    def __getitem__(self, index) -> "DiscretizedLogisticMixture":
        """The mixtures at ``index`` of the batch dimensions."""
        return self._map(lambda p: p[index])

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        """Integer samples: pick a component, draw a logistic, round."""
        j = torch.distributions.Categorical(logits=self.log_weights).sample().unsqueeze(-1)
        mu, log_s = self.means.gather(-1, j).squeeze(-1), self.log_scales.gather(-1, j).squeeze(-1)
        u = torch.rand_like(mu).clamp(1e-6, 1 - 1e-6)
        return torch.round(mu + temperature * torch.exp(log_s) * (torch.log(u) - torch.log1p(-u)))
