"""2-D toy densities and the unnormalised target energies of Rezende & Mohamed (2015).

Data sets (``sample(name, n, generator) -> (n, 2)`` float tensors, roughly in [-4, 4]^2):
    two_moons      two interleaved half circles with Gaussian noise
    8gaussians     a ring of 8 Gaussians (radius 2.8, std 0.2)
    checkerboard   uniform on the dark squares of a 4 x 4 board over [-4, 4]^2
    spirals        two interleaved spirals
    rings          three concentric noisy rings
    letters        points on the lit pixels of a word drawn with PIL's default font
                   ("FLOW" by default), jittered within each pixel

Energies (``energy(name, z) -> U(z)``, target density proportional to exp(-U)), from
Rezende & Mohamed 2015, Table 1, with w1 = sin(2 pi z1 / 4), w2 = 3 exp(-((z1 - 1)/0.6)^2 / 2),
w3 = 3 sigmoid((z1 - 1) / 0.3):
    u1 = ((|z| - 2) / 0.4)^2 / 2 - log(exp(-((z1 - 2)/0.6)^2 / 2) + exp(-((z1 + 2)/0.6)^2 / 2))
    u2 = ((z2 - w1) / 0.4)^2 / 2
    u3 = -log(exp(-((z2 - w1)/0.35)^2 / 2) + exp(-((z2 - w1 + w2)/0.35)^2 / 2))
    u4 = -log(exp(-((z2 - w1)/0.4)^2 / 2) + exp(-((z2 - w1 + w3)/0.35)^2 / 2))
U2-U4 constrain z2 given z1 only, so exp(-U) is not normalisable along z1 (reverse KL would
spread q along z1 forever).  The paper shows them on [-4, 4]^2; we add a soft wall
((|z1| - 4)_+ / 0.2)^2 / 2 that confines them to that box (zero inside it).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

DATASETS = ("two_moons", "8gaussians", "checkerboard", "spirals", "rings", "letters")
ENERGIES = ("u1", "u2", "u3", "u4")


def _randn(n, g, *shape):
    return torch.randn(n, *shape, generator=g)


def _rand(n, g, *shape):
    return torch.rand(n, *shape, generator=g)


def two_moons(n, g):
    k = n // 2
    t1 = math.pi * _rand(k, g)
    t2 = math.pi * _rand(n - k, g)
    upper = torch.stack([torch.cos(t1), torch.sin(t1)], 1)
    lower = torch.stack([1 - torch.cos(t2), 0.5 - torch.sin(t2)], 1)
    x = torch.cat([upper, lower]) + 0.08 * _randn(n, g, 2)
    x = (x - torch.tensor([0.5, 0.25])) * 2.0
    return x[torch.randperm(n, generator=g)]


def eight_gaussians(n, g):
    k = torch.randint(0, 8, (n,), generator=g).float()
    angle = 2 * math.pi * k / 8
    centers = 2.8 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return centers + 0.2 * _randn(n, g, 2)


def checkerboard(n, g):
    # columns -4..4 in units of 2: pick a square (i, j) with i + j even
    x1 = 8 * _rand(n, g) - 4
    col = torch.floor((x1 + 4) / 2)
    row = torch.randint(0, 2, (n,), generator=g).float() * 2 + (col % 2)
    x2 = row * 2 - 4 + 2 * _rand(n, g)
    return torch.stack([x1, x2], 1)


def spirals(n, g):
    k = n // 2
    t = torch.sqrt(_rand(n, g)) * 3 * math.pi
    sign = torch.cat([torch.ones(k), -torch.ones(n - k)])
    x = sign[:, None] * torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3
    return x + 0.1 * _randn(n, g, 2)


def rings(n, g):
    radius = (torch.randint(0, 3, (n,), generator=g).float() + 1) * 1.1
    angle = 2 * math.pi * _rand(n, g)
    x = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return x + 0.08 * _randn(n, g, 2)


@lru_cache(maxsize=8)
def _word_pixels(word: str) -> torch.Tensor:
    """(row, col) of lit pixels of ``word`` in PIL's default bitmap font, scaled into the box."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
    w, h = box[2] - box[0] + 2, box[3] - box[1] + 2
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).text((1 - box[0], 1 - box[1]), word, fill=255, font=font)
    lit = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w) > 127
    rows, cols = torch.nonzero(lit, as_tuple=True)
    return torch.stack([rows.float(), cols.float()], 1), h, w


def letters(n, g, word: str = "FLOW"):
    pix, h, w = _word_pixels(word)
    idx = torch.randint(0, pix.shape[0], (n,), generator=g)
    rc = pix[idx] + _rand(n, g, 2)  # uniform within each lit pixel
    scale = 7.0 / max(h, w)
    x1 = (rc[:, 1] - w / 2) * scale
    x2 = (h / 2 - rc[:, 0]) * scale
    return torch.stack([x1, x2], 1)


_SAMPLERS = {"two_moons": two_moons, "8gaussians": eight_gaussians, "checkerboard": checkerboard,
             "spirals": spirals, "rings": rings, "letters": letters}


def sample(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown toy data set {name!r}; known: {', '.join(DATASETS)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return _SAMPLERS[name](n, g)


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """U(z) of shape (B,) for z of shape (B, 2)."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    wall = 0.5 * (torch.relu(z1.abs() - 4) / 0.2) ** 2
    if name == "u1":
        a = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2
        return a - torch.logsumexp(torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2]), 0)
    if name == "u2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2 + wall
    if name == "u3":
        w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
        return -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2]), 0) + wall
    if name == "u4":
        w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
        return -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2]), 0) + wall
    raise ValueError(f"unknown energy {name!r}; known: {', '.join(ENERGIES)}")


@lru_cache(maxsize=8)
def log_partition(name: str, half_width: float = 8.0, res: int = 801) -> float:
    """log Z = log ∫ exp(-U(z)) dz of energy ``name``, by the midpoint rule on [-w, w]^2 in
    float64 (``res`` x ``res`` cells; the mass of U1-U4, walls included, lies well inside w = 8).
    With it a reverse-KL fit reports KL(q || p) = E_q[log q(x) + U(x)] + log Z itself."""
    h = 2 * half_width / res
    c = (torch.arange(res, dtype=torch.float64) + 0.5) * h - half_width
    z = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    return float(torch.logsumexp(-energy(name, z), 0) + 2 * math.log(h))
