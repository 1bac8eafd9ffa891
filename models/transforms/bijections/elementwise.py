"""Fixed element-wise pre-processing bijections.

ScaleShift:  y = a * x + b,                      log|det| = D log|a|
Logit (RealNVP §4.1, Flow++, Residual Flows): for x in [0, 1),
    p = alpha + (1 - 2 alpha) x,   y = log p - log(1 - p)
    log|det| = sum [ log(1 - 2 alpha) - log p - log(1 - p) ]
    (alpha = 0.05 is Flow++'s ImgProc: x * 0.9 + 0.05, then logit)
Sigmoid (Flow++ dequantizer's last layer): y = sigmoid(x) = Inverse(Logit(0)),
    log|det| = sum [ -softplus(x) - softplus(-x) ]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.core.compose import Inverse
from models.core.transform import Transform, compute_dtype, sum_except_batch


class ScaleShift(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        if scale == 0:
            raise ValueError("ScaleShift needs a non-zero scale")
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, x, context=None):
        d = x[0].numel()
        ldj = torch.full((x.shape[0],), d * math.log(abs(self.scale)), device=x.device, dtype=compute_dtype(x))
        return x * self.scale + self.shift, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        return (z - self.shift) / self.scale


class Logit(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError("Logit needs 0 <= alpha < 0.5")
        self.alpha = float(alpha)

    def forward(self, x, context=None):
        p = self.alpha + (1 - 2 * self.alpha) * x.to(compute_dtype(x))
        y = torch.log(p) - torch.log1p(-p)
        ldj = sum_except_batch(math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p))
        return y.to(x.dtype), ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        return (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)

    def inverse_with_ldj(self, z, context=None):
        """x = (sigmoid(z) - alpha) / (1 - 2 alpha),
        log|dx/dz| = sum [ -softplus(z) - softplus(-z) - log(1 - 2 alpha) ]  (log s + log(1 - s), stably)."""
        zc = z.to(compute_dtype(z))
        ldj = sum_except_batch(-F.softplus(zc) - F.softplus(-zc) - math.log(1 - 2 * self.alpha))
        return self.inverse(z).to(z.dtype), ldj


class Sigmoid(Inverse):
    """y = sigmoid(x): the inverse of ``Logit(0)``."""

    def __init__(self):
        super().__init__(Logit(0.0))
