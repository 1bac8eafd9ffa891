"""Turning model samples into PNG grids, counting (not hiding) non-finite pixels."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(samples: torch.Tensor, num_bits: int) -> tuple[torch.Tensor, int]:
    """Integer samples in [0, 2^n) -> uint8 in [0, 255] for display.

    Returns the images and the number of non-finite pixels, which are shown as 0
    (black) and must be reported by the caller.
    """
    samples = samples.float()
    bad = ~torch.isfinite(samples)
    n_bad = int(bad.sum())
    samples = torch.where(bad, torch.zeros_like(samples), samples)
    scale = 256 // (2 ** num_bits)
    return (samples * scale).clamp(0, 255).to(torch.uint8), n_bad


def save_grid(rows: list[torch.Tensor], path: str) -> None:
    """Save uint8 image batches as one PNG, one row per batch (e.g. per temperature)."""
    ncol = max(r.shape[0] for r in rows)
    padded = []
    for r in rows:
        if r.shape[0] < ncol:
            r = torch.cat([r, torch.zeros(ncol - r.shape[0], *r.shape[1:], dtype=r.dtype)])
        padded.append(r)
    grid = make_grid(torch.cat(padded).cpu(), nrow=ncol, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(path)


def grid_layout(n: int, num_rows: int) -> int:
    """Images per row when ``n`` images are spread over ``num_rows`` rows."""
    return max(1, -(-n // max(1, num_rows)))


def save_sample_grid(draw, num_bits: int, n: int, temperatures, path: str) -> dict:
    """One row of ``draw(per_row, temperature)`` samples (integers in [0, 2^num_bits)) per
    temperature, ``n`` images in all, saved as a PNG grid at ``path``.

    Returns ``{"path", "tb_image"`` (the grid as a (C, H, W) uint8 tensor), ``"nonfinite"``
    (non-finite pixels, shown black)``}``."""
    per_row = grid_layout(n, len(temperatures))
    rows, bad = [], 0
    for temp in temperatures:
        images, n_bad = to_uint8(draw(per_row, temp), num_bits)
        rows.append(images)
        bad += n_bad
    save_grid(rows, path)
    return {"path": path, "tb_image": make_grid(torch.cat(rows), nrow=per_row), "nonfinite": bad}
