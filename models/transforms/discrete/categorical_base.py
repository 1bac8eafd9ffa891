"""The base distribution of Discrete Flows (Tran et al. 2019, arXiv:1905.10347 §2): a learned
factorized categorical over one-hot latents z of shape (C, H, W, K),

    log P(z) = sum_{c,h,w} sum_k z_{chwk} log softmax(theta_{chw})_k

one logit vector theta per element (zero-initialised: uniform, log2 K bits per element).  A pmf
(``discrete``), so with bijective layers before it log p(x) = log P(f(x)) is exact.  ``sample``
draws from softmax(theta / T) (T = 0: the argmax), as one-hots.
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.distributions import Distribution
from models.core.transform import sum_except_batch
from models.transforms.discrete.modular_affine import to_one_hot


class FactorizedCategorical(Distribution):
    discrete = True

    def __init__(self, shape):
        """``shape``: (..., K), the classes last."""
        super().__init__(shape)
        self.logits = nn.Parameter(torch.zeros(*self.shape))

    def log_prob(self, z):
        log_p = torch.log_softmax(self.logits.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
        return sum_except_batch(z * log_p)

    def sample(self, n, temperature=1.0):
        logits = self.logits.detach().unsqueeze(0).expand(n, *self.shape)
        if temperature <= 0:
            index = logits.argmax(dim=-1)
        else:
            flat = torch.softmax(logits / temperature, dim=-1).reshape(-1, self.shape[-1])
            index = torch.multinomial(flat, 1).reshape(n, *self.shape[:-1])
        return to_one_hot(index, self.shape[-1], self.logits.dtype)
