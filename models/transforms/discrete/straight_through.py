"""One-hot argmax with the straight-through gradient of Discrete Flows (Tran et al. 2019,
arXiv:1905.10347 §2.1):

    forward:   one_hot(argmax_k theta_k)                  (exactly 0 / 1)
    backward:  d/d theta of softmax(theta / tau)          (the "soft" one-hot)

written as ``hard + (soft - soft.detach())``: ``soft - soft.detach()`` is exactly 0 in value,
so the forward is the hard one-hot bit for bit, and autograd sees only ``soft``.  Ties in
``argmax`` go to the first maximal index (an all-zero, freshly initialised logit vector picks
class 0), the same in every call, so a layer's forward and inverse agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """one_hot(argmax(logits, -1)) in the logits' dtype, no gradient."""
    return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)


def straight_through_one_hot(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Forward: the one-hot argmax of ``logits`` (last dim = classes); backward: the gradient
    of softmax(logits / tau)."""
    if tau <= 0:
        raise ValueError(f"the straight-through temperature tau must be > 0, got {tau}")
    soft = torch.softmax(logits / tau, dim=-1)
    return one_hot_argmax(logits.detach()) + (soft - soft.detach())
