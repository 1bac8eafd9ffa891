"""ActNorm's affine normalisation with data-dependent init (Kingma & Dhariwal 2018,
arXiv:1807.03039 §3.1), as a plain network layer:

    y = (x + b) * exp(s)            per channel (or per element with ``spatial_shape``)

Data-dependent init on the first batch it sees: b = -mean, s = log(scale / (std + eps)),
so the output has zero mean and unit variance per channel.  ``s`` is stored divided by
``logscale_factor`` (3 in the official code), which scales its effective learning rate.
The ``initialized`` flag is a buffer, so it travels with checkpoints and a loaded model
is never re-initialised.  ``models.transforms.bijections.actnorm.ActNorm`` is the same
map as a bijection (with its log-determinant and inverse).
"""
from __future__ import annotations

import torch
from torch import nn


def _at_least_float32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class ActNorm2d(nn.Module):
    """The affine normalisation alone, as a network layer (inside conditioner networks)."""

    needs_data_init = True  # initialises from the first batch it sees

    def __init__(self, num_channels: int, scale: float = 1.0, logscale_factor: float = 3.0, eps: float = 1e-6,
                 spatial_shape: tuple[int, int] | None = None):
        super().__init__()
        self.per_element = spatial_shape is not None
        shape = (1, num_channels, *spatial_shape) if self.per_element else (1, num_channels, 1, 1)
        self.bias = nn.Parameter(torch.zeros(shape))
        self.logs = nn.Parameter(torch.zeros(shape))
        self.scale, self.logscale_factor, self.eps = scale, logscale_factor, eps
        self.register_buffer("initialized", torch.zeros(()))
        self._known_initialized = False  # host-side copy of the flag: no device sync per call

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        x = x.to(_at_least_float32(x))
        dims = (0,) if self.per_element else (0, 2, 3)
        mean = x.mean(dim=dims, keepdim=True)
        std = (x - mean).pow(2).mean(dim=dims, keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (std + self.eps)) / self.logscale_factor)
        self.initialized.fill_(1.0)
        self._known_initialized = True

    def _log_scale(self) -> torch.Tensor:
        return self.logs * self.logscale_factor

    def is_initialized(self) -> bool:
        """Whether data-dependent init has run (read from the device once, then known)."""
        if not self._known_initialized and bool(self.initialized):
            self._known_initialized = True
        return self._known_initialized

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The affine map alone (used inside conditioner networks)."""
        if not self.is_initialized():
            self._initialize(x)
        scale = torch.exp(self._log_scale()).to(x.dtype)
        return torch.addcmul(self.bias.to(x.dtype) * scale, x, scale)  # (x + b) * s in one pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)
