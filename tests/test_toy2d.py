"""2-D toy data, the Rezende & Mohamed energies, and the scripts/toy2d.py script."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from data import toy2d

from scripts import toy2d as toy_script


@pytest.mark.parametrize("name", toy2d.DATASETS)
def test_datasets_are_seeded_2d_and_in_the_box(name):
    a = toy2d.sample(name, 2000, torch.Generator().manual_seed(1))
    b = toy2d.sample(name, 2000, torch.Generator().manual_seed(1))
    assert a.shape == (2000, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    assert a.abs().max() < 4.0 and a.std(dim=0).min() > 0.3


def test_dataset_shapes_are_what_they_claim():
    g = torch.Generator().manual_seed(0)
    r = toy2d.sample("rings", 3000, g).norm(dim=1)
    for radius in (1.1, 2.2, 3.3):  # three rings: many points near each radius, few in between
        assert ((r - radius).abs() < 0.2).float().mean() > 0.25
    assert ((r - 1.65).abs() < 0.1).float().mean() < 0.02
    c = toy2d.sample("checkerboard", 4000, g)
    cells = torch.floor((c + 4) / 2).long()
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all()), "points only on one colour of the board"
    e = toy2d.sample("8gaussians", 4000, g)
    angles = torch.atan2(e[:, 1], e[:, 0]) / (2 * math.pi / 8)
    assert (angles - angles.round()).abs().quantile(0.99) < 0.3  # angular std 0.2 / 2.8 rad, sectors 0.79 rad


def test_letters_follow_the_rendered_word():
    pix, h, w = toy2d._word_pixels("FLOW")
    assert 20 < pix.shape[0] < h * w, "some but not all pixels of the bitmap are lit"
    x = toy2d.letters(5000, torch.Generator().manual_seed(0), word="FLOW")
    assert x[:, 0].max() - x[:, 0].min() > 2 * (x[:, 1].max() - x[:, 1].min()), "a word is wider than tall"
    # points land only on lit pixels: map them back to the bitmap
    scale = 7.0 / max(h, w)
    col = torch.floor(x[:, 0] / scale + w / 2).long()
    row = torch.floor(h / 2 - x[:, 1] / scale).long()
    lit = set(map(tuple, pix.long().tolist()))
    assert all((r, c) in lit for r, c in zip(row.tolist()[:500], col.tolist()[:500]))


def test_energies_match_the_paper_formulas():
    z = torch.tensor([[0.3, -1.2], [2.0, 0.0], [-1.0, 0.5]])
    z1, z2 = z[:, 0], z[:, 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    u2 = 0.5 * ((z2 - w1) / 0.4) ** 2
    assert torch.allclose(toy2d.energy("u2", z), u2)
    u1 = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2 - torch.log(
        torch.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + torch.exp(-0.5 * ((z1 + 2) / 0.6) ** 2))
    assert torch.allclose(toy2d.energy("u1", z), u1)
    for name in toy2d.ENERGIES:
        assert torch.isfinite(toy2d.energy(name, 3 * torch.randn(100, 2))).all()
    # U2-U4 get a soft wall outside |z1| <= 4 (they are not normalisable along z1 without it)
    inside, outside = torch.tensor([[3.9, 0.0]]), torch.tensor([[5.0, 0.0]])
    w1 = torch.sin(2 * math.pi * outside[:, 0] / 4)
    assert torch.allclose(toy2d.energy("u2", outside), 0.5 * (w1 / 0.4) ** 2 + 0.5 * (1.0 / 0.2) ** 2)
    assert torch.allclose(toy2d.energy("u2", inside), 0.5 * (torch.sin(2 * math.pi * inside[:, 0] / 4) / 0.4) ** 2)
    # U1 has its minima on the ring |z| = 2 near z1 = +-2
    assert toy2d.energy("u1", torch.tensor([[2.0, 0.0]])) < toy2d.energy("u1", torch.tensor([[0.0, 0.0]]))


def test_realnvp_learns_two_moons_and_writes_a_figure(tmp_path):
    torch.set_num_threads(1)
    model, layers, base, hist = toy_script.fit("realnvp", data="two_moons", steps=300, batch=128, layers=4)
    first, last = sum(hist[:20]) / 20, sum(hist[-20:]) / 20
    assert last < first - 0.5, (first, last)
    path = tmp_path / "fig.png"
    panels = toy_script.render(model, layers, base, "realnvp", "two_moons", None, str(path), res=32, n_samples=2000)
    img = Image.open(path)
    assert img.size == (3 * (256 + 6) + 6, 256 + 18 + 6)
    assert len(panels) == 3 and all(torch.isfinite(p[1]).all() for p in panels)


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester", "iaf"])
def test_reverse_kl_on_an_energy_decreases(flow):
    torch.set_num_threads(1)
    _, layers, base, hist = toy_script.fit(flow, energy="u1", steps=200, batch=128, layers=4, log_every=0,
                                           anneal=False)
    # KL(q || p) + log Z falls (no annealing here, so the losses are comparable)
    assert sum(hist[-20:]) / 20 < sum(hist[:20]) / 20 - 0.2, (hist[:5], hist[-5:])
    # the push-forward density can be evaluated on a grid through the layers' inverses
    logq = toy_script.pull_back_log_q(layers, base, toy_script.grid(8))
    assert torch.isfinite(logq).all()


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "nice.png"
    final = toy_script.main(["--flow", "nice", "--data", "8gaussians", "--steps", "30", "--out", str(out)])
    assert out.is_file() and math.isfinite(final)
