"""Cheap, seeded augmentation of integer training images (flips and translations)."""

from __future__ import annotations

import torch


def augment(x: torch.Tensor, hflip: bool, translate: float, generator: torch.Generator) -> torch.Tensor:
    """Randomly mirror (p=0.5) and shift each image of a (B,C,H,W) batch, replicating edge pixels.

    Shifts are integers drawn uniformly from [-round(translate*H), round(translate*H)]
    (rows) and likewise for columns, independently per image. The random draws come
    from ``generator`` only, so the result is reproducible; with both options off
    ``x`` itself is returned.
    """
    b, _, h, w = x.shape
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)
    max_dy, max_dx = round(translate * h), round(translate * w)
    if max_dy > 0 or max_dx > 0:
        dy = torch.randint(-max_dy, max_dy + 1, (b, 1), generator=generator).to(x.device)
        dx = torch.randint(-max_dx, max_dx + 1, (b, 1), generator=generator).to(x.device)
        # Output pixel (i, j) reads input pixel (i - dy, j - dx), clamped to the border.
        rows = (torch.arange(h, device=x.device) - dy).clamp_(0, h - 1)
        cols = (torch.arange(w, device=x.device) - dx).clamp_(0, w - 1)
        x = x.gather(2, rows.view(b, 1, h, 1).expand_as(x))
        x = x.gather(3, cols.view(b, 1, 1, w).expand_as(x))
    return x
