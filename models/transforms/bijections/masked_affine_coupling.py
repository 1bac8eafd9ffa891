"""RealNVP affine coupling with a binary mask (Dinh, Sohl-Dickstein & Bengio 2017, §3.3-3.4).

For a fixed mask ``b`` (checkerboard or channel for images, alternating/half for vectors):

    h = NN(b * x);   s = scale * tanh(h_s),   t = h_t        (both multiplied by 1 - b)
    z = b * x + (1 - b) * (x * exp(s) + t)
    log|det dz/dx| = sum (1 - b) * s

Inverse: x = b * z + (1 - b) * (z - t) * exp(-s), with s, t from NN(b * z) (= NN(b * x)).
``net`` maps a tensor shaped like ``x`` to one with twice the channels/features
(``[h_s, h_t]`` stacked on dim 1); ``scale`` is a learned per-feature factor (RealNVP's
``tanh`` scale, initialised at 1), so the log-scale is bounded.  Works for any shape
(B, D) or (B, C, H, W): the mask has the shape of one example.  Arithmetic and ldj run
in at least float32 (the network may run in bf16).
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.transform import Transform, compute_dtype, sum_except_batch


class MaskedAffineCoupling(Transform):
    invertible_backprop = True  # closed-form inverse: activation_memory=invertible may drop its activations
    def __init__(self, net: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mask", mask.float())
        self.scale = nn.Parameter(torch.ones(mask.shape[0], *([1] * (mask.dim() - 1))))

    def _s_t(self, x_masked: torch.Tensor, context=None):
        dtype = compute_dtype(x_masked)
        h = self.net(x_masked) if context is None else self.net(x_masked, context)
        h = h.to(dtype)
        c = h.shape[1] // 2
        inv = (1 - self.mask).to(dtype)
        s = self.scale.to(dtype) * torch.tanh(h[:, :c]) * inv
        t = h[:, c:] * inv
        return s, t

    def forward(self, x, context=None):
        m = self.mask.to(x.dtype)
        s, t = self._s_t(x * m, context)
        z = x.to(s.dtype) * torch.exp(s) + t  # s = t = 0 on the masked part: z = x there
        return z.to(x.dtype), sum_except_batch(s)

    def inverse(self, z, context=None, *, temperature=1.0):
        m = self.mask.to(z.dtype)
        s, t = self._s_t(z * m, context)
        x = (z.to(s.dtype) - t) * torch.exp(-s)
        return x.to(z.dtype)
