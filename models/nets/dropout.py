"""Dropout (Srivastava et al. 2014, JMLR 15) with a cheaper mask on the CPU.

    y = x * m / (1 - p),   m_i ~ Bernoulli(1 - p) i.i.d.       (training; y = x in eval mode)

The same function and distribution as ``nn.Dropout``.  On a CPU torch draws the mask with
``bernoulli_``: one call of the generator per element in a serial loop (5.8 ms for a
4 x 192 x 32 x 32 mask on the 2-core AVX-512 machine of the README, where Flow++'s dropout was 8.6%
of a paper-config step).  Here the mask comes from 64-bit random words of the same generator, each
cut into two 32-bit uniforms u (half the generator calls: 1.9 ms for the same mask); an element is
dropped when u < k with k = round(p 2^32), so P(drop) = k / 2^32 (p to 2^-32, finer than ``torch.rand``'s 2^-24)
and the scale is 1 / (1 - k / 2^32): E[y] = x exactly.  The mask is kept as booleans for the
backward (``nn.Dropout`` keeps a float mask: 4x the memory).  It follows x's memory layout (an
NHWC activation gets an NHWC mask), so its draws differ from ``nn.Dropout``'s and between layouts
(equally distributed).  The seeded global generator makes every run repeatable, and a replay of
the generator's state (``models.core.activation_memory``) draws the same mask again.  On other
devices it is torch's own dropout (CUDA's fused kernel draws in parallel already).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_WORD = 2 ** 32


class _Masked(torch.autograd.Function):
    """y = x / (1 - p) where the mask keeps it, 0 where it drops; linear in x, so the backward is
    the same map of the gradient (through this same Function: every order)."""

    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        if torch.compiler.is_compiling():  # torch 2.11's compiled backward of the in-place fill is zero
            return x.mul(scale).masked_fill(drop, 0)
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return _Masked.apply(grad, drop, ctx.scale), None, None


def drop_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Booleans shaped and laid out like ``x`` (which must be dense), True with probability k / 2^32."""
    n = x.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    drop = words.view(torch.int32)[:n] < k - 2 ** 31  # int32 halves: uniform on [-2^31, 2^31)
    return drop.as_strided(x.shape, x.stride())


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask of the module docstring on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not _dense(x):
        return F.dropout(x, p, training)
    k = round(p * _WORD)
    return _Masked.apply(x, drop_mask(x, k), _WORD / (_WORD - k))


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dimension order (contiguous, channels_last, ...)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or \
        (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))


class Dropout(nn.Module):
    """``nn.Dropout(p)`` (same state, no parameters) with the CPU mask of ``dropout``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
