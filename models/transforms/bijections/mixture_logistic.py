"""Logistic-mixture CDF coupling (Ho et al. 2019, Flow++ §3.1, eq. 4-5).

The input splits along channels into x = [x_a, x_b] (the Flow++ builder stacks the two
halves of a checkerboard or channel split along channels, see ``checkerboard.py``); a
network sees x_a (and an optional context) and outputs, per element of x_b, a shift t,
a raw scale s and the logits pi, means mu and log-scales l (clamped at -7) of K logistics:

    F(x)  = sum_k softmax(pi)_k sigmoid((x - mu_k) exp(-l_k))        (mixture CDF)
    z_b   = logit(F(x_b)) * exp(tanh(s)) + t                          (official order:
                                                                      MixLogisticCDF -> Inverse(Sigmoid) -> ElemwiseAffine)
    log|det| = sum [ log f(x_b) - log F(x_b) - log(1 - F(x_b)) + tanh(s) ]

with f the mixture density.  logit(F) and log F + log(1 - F) are computed from the
mixture's log-CDF and log-survival function (both log-sum-exps), so they stay finite
where F rounds to 0 or 1 in float32.

Inverse: y = (z_b - t) exp(-tanh(s)), then x_b solves logit(F(x)) = y by bisection.
logit(F) is increasing, and since min_k sigmoid((x - mu_k)/s_k) <= F(x) <= max_k (...),
the root lies in [min_k (mu_k + s_k y), max_k (mu_k + s_k y)]: an exact bracket for
any y (extreme inputs, sharp mixtures).  Bisection halves it in the compute dtype
(float32 for float32 inputs) until the midpoint equals an end point (float resolution)
or ``max_iters`` is reached.

``components = 0`` gives the paper's "affine coupling" ablation: z_b = x_b exp(tanh(s)) + t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.core.bisection import bisect
from models.core.transform import Transform, compute_dtype, sum_except_batch

MIN_LOG_SCALE = -7.0


def _standardized(x, means, log_scales):
    return (x.unsqueeze(-1) - means) * torch.exp(-log_scales)


def mixture_log_cdf(x, logits, means, log_scales):
    """log F(x) of a logistic mixture; the parameters carry the K components in their last dim."""
    return torch.logsumexp(F.log_softmax(logits, -1) + F.logsigmoid(_standardized(x, means, log_scales)), -1)


def mixture_log_sf(x, logits, means, log_scales):
    """log(1 - F(x)), computed directly (no cancellation)."""
    return torch.logsumexp(F.log_softmax(logits, -1) + F.logsigmoid(-_standardized(x, means, log_scales)), -1)


def mixture_log_pdf(x, logits, means, log_scales):
    z = _standardized(x, means, log_scales)
    return torch.logsumexp(F.log_softmax(logits, -1) - z - log_scales - 2 * F.softplus(-z), -1)


def mixture_log_cdf_sf_pdf(x, logits, means, log_scales):
    """(log F, log(1 - F), log f) in one pass: log sigmoid(-z) = log sigmoid(z) - z and the
    logistic log-density is log sigmoid(z) + log sigmoid(-z) - l."""
    log_w = F.log_softmax(logits, -1)
    z = _standardized(x, means, log_scales)
    a = F.logsigmoid(z) + log_w
    b = a - z
    return torch.logsumexp(a, -1), torch.logsumexp(b, -1), torch.logsumexp(a + b - log_w - log_scales, -1)


def mixture_logit_cdf(x, logits, means, log_scales):
    """logit(F(x)) = log F(x) - log(1 - F(x))."""
    return mixture_log_cdf(x, logits, means, log_scales) - mixture_log_sf(x, logits, means, log_scales)


@torch.no_grad()
def mixture_inverse_logit_cdf(y, logits, means, log_scales, max_iters: int = 200):
    """x with logit(F(x)) = y, by bisection on an exact bracket (see the module docstring).

    Works in ``y``'s dtype; returns ``(x, iterations)``.
    """
    ends = means + torch.exp(log_scales) * y.unsqueeze(-1)
    lo, hi = ends.min(-1).values, ends.max(-1).values
    return bisect(lambda x: mixture_logit_cdf(x, logits, means, log_scales), y, lo, hi, max_iters)


class MixtureLogisticCoupling(Transform):
    """Flow++ coupling. ``net(x_a, context)`` returns C_b * (2 + 3K) channels laid out as
    (C_b, 2 + 3K): [s, t, logits (K), means (K), log-scales (K)] per element."""

    exact_inverse = False  # bisection

    def __init__(self, net: nn.Module, split_channels: int, components: int, max_iters: int = 200):
        super().__init__()
        self.net, self.split_channels, self.components, self.max_iters = net, split_channels, components, max_iters
        self.invertible_backprop = components == 0  # the affine case inverts in closed form (no bisection)

    def _params(self, x_a, context):
        h = self.net(x_a, context).to(compute_dtype(x_a))
        b, _, hh, ww = h.shape
        h = h.reshape(b, -1, 2 + 3 * self.components, hh, ww)
        log_scale, shift = torch.tanh(h[:, :, 0]), h[:, :, 1]
        if self.components == 0:
            return log_scale, shift, None
        k = self.components
        mix = h[:, :, 2:].permute(0, 1, 3, 4, 2).contiguous()
        logits, means, log_scales = mix[..., :k], mix[..., k:2 * k], mix[..., 2 * k:].clamp(min=MIN_LOG_SCALE)
        return log_scale, shift, (logits, means, log_scales)

    def forward(self, x, context=None):
        x_a, x_b = x[:, : self.split_channels], x[:, self.split_channels:]
        log_scale, shift, mix = self._params(x_a, context)
        x_b = x_b.to(log_scale.dtype)
        if mix is None:
            y, log_det = x_b, log_scale
        else:
            log_cdf, log_sf, log_pdf = mixture_log_cdf_sf_pdf(x_b, *mix)
            y = log_cdf - log_sf
            log_det = log_pdf - log_cdf - log_sf + log_scale
        z_b = y * torch.exp(log_scale) + shift
        return torch.cat([x_a.to(z_b.dtype), z_b], dim=1), sum_except_batch(log_det)

    def inverse(self, z, context=None, *, temperature=1.0):
        z_a, z_b = z[:, : self.split_channels], z[:, self.split_channels:]
        log_scale, shift, mix = self._params(z_a, context)
        y = (z_b.to(log_scale.dtype) - shift) * torch.exp(-log_scale)
        x_b = y if mix is None else mixture_inverse_logit_cdf(y, *mix, max_iters=self.max_iters)[0]
        return torch.cat([z_a.to(x_b.dtype), x_b], dim=1)
