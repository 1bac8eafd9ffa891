"""Figures of 2-D models (PIL only): panels of densities and sample histograms side by side.

    data (or target exp(-U)) | learned density | samples from the model

on the box [-BOX, BOX]^2, each panel normalised to its own maximum with a magma-like
palette.  ``grid(res)`` gives the cell centres (row 0 at the top, i.e. the largest x2), so a
density evaluated on it reshapes to (res, res) and lines up with ``histogram(points, res)``.
"""
from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw

BOX = 4.0

_PALETTE = torch.tensor([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]],
                        dtype=torch.float32)


def colorize(values: torch.Tensor) -> Image.Image:
    """(H, W) non-negative values -> RGB image with a magma-like palette (max -> brightest)."""
    v = values.float().nan_to_num(0.0).clamp_min(0)
    v = v / v.max().clamp_min(1e-12)
    pos = v * (len(_PALETTE) - 1)
    lo = pos.floor().long().clamp(max=len(_PALETTE) - 2)
    frac = (pos - lo)[..., None]
    rgb = _PALETTE[lo] * (1 - frac) + _PALETTE[lo + 1] * frac
    return Image.fromarray(rgb.round().to(torch.uint8).numpy(), "RGB")


def histogram(points: torch.Tensor, res: int) -> torch.Tensor:
    """(res, res) counts of the finite ``points`` (N, 2) in the cells of ``grid(res)``."""
    p = points.detach().float().cpu()
    p = p[torch.isfinite(p).all(dim=1)]
    ij = ((p + BOX) / (2 * BOX) * res).floor().long()
    keep = ((ij >= 0) & (ij < res)).all(dim=1)
    ij = ij[keep]
    h = torch.zeros(res * res)
    h.index_add_(0, (res - 1 - ij[:, 1]) * res + ij[:, 0], torch.ones(ij.shape[0]))
    return h.reshape(res, res)


def grid(res: int) -> torch.Tensor:
    """(res * res, 2) cell centres of [-BOX, BOX]^2, row-major from the top-left cell."""
    c = (torch.arange(res) + 0.5) / res * 2 * BOX - BOX
    x1 = c[None, :].expand(res, res)
    x2 = c.flip(0)[:, None].expand(res, res)  # row 0 at the top = largest x2
    return torch.stack([x1.reshape(-1), x2.reshape(-1)], 1)


def figure(panels: list[tuple[str, torch.Tensor]], path: str, size: int = 256) -> Image.Image:
    """Write the (title, (res, res) values) panels side by side to ``path``; returns the image."""
    pad, title = 6, 18
    img = Image.new("RGB", (len(panels) * (size + pad) + pad, size + title + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (name, values) in enumerate(panels):
        x0 = pad + k * (size + pad)
        img.paste(colorize(values.detach().cpu()).resize((size, size), Image.NEAREST), (x0, title))
        draw.text((x0, 3), name, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return img


def on_grid(fn, res: int, device, chunk: int = 4096) -> torch.Tensor:
    """exp(fn(points)) on ``grid(res)`` as (res, res): ``fn`` maps (B, 2) points to log-densities (B,)."""
    pts = grid(res).to(device)
    return torch.exp(torch.cat([fn(p).detach().float().cpu() for p in pts.split(chunk)])).reshape(res, res)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a (3, H, W) uint8 tensor (TensorBoard's layout)."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3).permute(2, 0, 1)
