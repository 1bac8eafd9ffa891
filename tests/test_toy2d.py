"""2-D toy data and the Rezende & Mohamed energies (data/toy2d.py), the vector data sets
(data/vectors.py), the vector_flow family on the nll and reverse_kl objectives (in process and
end to end through train.py / eval.py / sample.py), and the 2-D figures (engine/figures.py)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from PIL import Image

from common.errors import FlowlabError
from data import VectorDataset, load_dataset, toy2d
from engine import figures
from engine.config import load_config
from engine.objectives import NegativeLogLikelihood, ReverseKL, annealed_beta
from models.architectures import architecture, build_model
from tests.helpers import ROOT, read_metric
from tests.helpers import run_command as run

EXPERIMENTS = os.path.join(ROOT, "experiments")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


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


def test_log_partition_by_quadrature():
    # U2 without its wall integrates in closed form: int exp(-((z2 - w1)/0.4)^2 / 2) dz2 = 0.4 sqrt(2 pi) for
    # every z1, over |z1| <= 4 plus the two half-Gaussian walls of scale 0.2
    closed = math.log(0.4 * math.sqrt(2 * math.pi) * (8 + 0.2 * math.sqrt(2 * math.pi)))
    assert toy2d.log_partition("u2") == pytest.approx(closed, abs=1e-5)
    for name in toy2d.ENERGIES:  # converged: a wider, finer grid gives the same number
        assert toy2d.log_partition(name) == pytest.approx(toy2d.log_partition(name, 10.0, 1001), abs=1e-5)


# ---- the vector data sets ----------------------------------------------------------------------

def test_toy2d_data_set_is_seeded_float_vectors():
    a = load_dataset("toy2d", toy="8gaussians", n_train=500, n_test=100)
    b = load_dataset("toy2d", toy="8gaussians", n_train=500, n_test=100, max_train=200)
    assert isinstance(a, VectorDataset) and a.kind == "vector" and a.shape == (2,) and a.num_dims == 2
    assert a.train.dtype == a.test.dtype == torch.float32 and a.train.shape == (500, 2) and a.test.shape == (100, 2)
    assert a.n_bits is None and a.label == "8gaussians" and "500 train / 100 test" in a.source
    assert torch.equal(b.train, a.train[:200]) and torch.equal(b.test, a.test) and "first 200 train" in b.source
    assert torch.equal(a.train[:100], toy2d.sample("8gaussians", 500, torch.Generator().manual_seed(0))[:100])
    assert not torch.equal(a.train[:100], a.test), "train and test are independent draws"
    none = load_dataset("none", dim=3)
    assert none.kind == "none" and none.train is None and none.test is None and none.shape == (3,)
    with pytest.raises(FlowlabError, match="data.n_train must be at least 1"):
        load_dataset("toy2d", n_train=0)


def test_vector_data_keys_are_checked_in_the_config():
    cfg = load_config(os.path.join(EXPERIMENTS, "toy2d_realnvp_two_moons.yaml"))
    assert cfg["data"]["toy"] == "two_moons" and cfg["dequantizer"] == {"kind": "none"}
    with pytest.raises(FlowlabError, match="'data.toy' must be one of"):
        load_config(os.path.join(EXPERIMENTS, "toy2d_realnvp_two_moons.yaml"), ["data.toy=moon"])
    with pytest.raises(FlowlabError, match="vector_flow' takes no dequantizer"):
        load_config(os.path.join(EXPERIMENTS, "toy2d_realnvp_two_moons.yaml"), ["dequantizer.kind=uniform"])


# ---- the vector_flow family and its objectives, in process -------------------------------------------

def _flow(flow, steps=4, dim=2, **keys):
    return build_model({"name": "vector_flow", **architecture("vector_flow").DEFAULTS, "flow": flow, "steps": steps,
                        **keys}, (dim,), None, {"kind": "none"})


def test_vector_flow_family_builds_every_kind():
    for flow in architecture("vector_flow").CHOICES["flow"]:
        model = _flow(flow, steps=3)
        x = torch.randn(5, 2)
        assert model.log_prob(x).shape == (5,) and model.sample(4).shape == (4, 2)
        assert len(model.transforms) == 3 + (flow == "nice")  # NICE ends in its diagonal scaling
    with pytest.raises(ValueError, match="vectors of shape"):
        build_model({"name": "vector_flow", **architecture("vector_flow").DEFAULTS}, (3, 8, 8), 8, {"kind": "none"})


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_push_forward_is_the_change_of_variables(flow, float64):
    """log q(T(z0)) = log N(z0) - log|det dT/dz0| (autograd), and push_forward_log_prob inverts T."""
    model = _flow(flow, steps=3).double()
    for p in model.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    z0 = torch.randn(4, 2)
    x, log_q = model.push_forward(z0)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: model.transforms(v.reshape(1, 2))[0].reshape(2), z0[i])
        expected = model.base.log_prob(z0[i:i + 1]) - torch.linalg.slogdet(jac)[1]
        assert torch.allclose(log_q[i], expected[0], atol=1e-8)
    x2, log_q2 = model(z0, as_sampler=True)  # the same map through forward (what DDP runs)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)
    assert torch.allclose(model.push_forward_log_prob(x), log_q, atol=1e-6)


def test_nll_objective_learns_two_moons_and_draws_the_figure(tmp_path, one_thread):
    torch.manual_seed(0)
    model = _flow("realnvp", steps=4)
    objective = NegativeLogLikelihood()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g, hist = torch.Generator().manual_seed(0), []
    for _ in range(300):
        loss, logs = objective(model, toy2d.sample("two_moons", 128, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(logs["nll"]))
    first, last = sum(hist[:20]) / 20, sum(hist[-20:]) / 20
    assert last < first - 0.5, (first, last)
    data = load_dataset("toy2d", toy="two_moons", n_train=100, n_test=2000)
    sample_cfg = type("S", (), {"n": 2000, "temperatures": (1.0,)})
    out = objective.save_samples(model.eval(), data, sample_cfg, str(tmp_path / "fig"))
    assert out["path"] == str(tmp_path / "fig.png") and out["nonfinite"] == 0
    assert Image.open(out["path"]).size == (3 * (256 + 6) + 6, 256 + 18 + 6)
    assert out["tb_image"].shape == (3, 256 + 18 + 6, 3 * (256 + 6) + 6) and out["tb_image"].dtype == torch.uint8


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester", "iaf"])
def test_reverse_kl_on_an_energy_decreases(flow, one_thread):
    torch.manual_seed(0)
    model = _flow(flow, steps=4)
    objective = ReverseKL(energy="u1", anneal_steps=0)  # no annealing: the losses are comparable
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if flow == "iaf" else 5e-3)
    g, hist = torch.Generator().manual_seed(0), []
    for step in range(200):
        objective.start_step(step)
        loss, logs = objective(model, objective.draw_batch(model, 128, g))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        hist.append(float(logs["reverse_kl"]))
    # KL(q || p) - log Z falls
    assert sum(hist[-20:]) / 20 < sum(hist[:20]) / 20 - 0.2, (hist[:5], hist[-5:])
    # the push-forward density can be evaluated on a grid through the layers' inverses
    assert torch.isfinite(model.push_forward_log_prob(figures.grid(8))).all()


def test_annealing_follows_rezende_and_mohamed():
    assert [annealed_beta(t, 100) for t in (0, 50, 99, 500)] == [0.01, 0.51, 1.0, 1.0]
    assert annealed_beta(0, 0) == 1.0
    objective = ReverseKL(energy="u2", anneal_steps=100)
    assert objective.beta == 0.01
    objective.start_step(50)
    z0 = objective.draw_batch(_flow("planar"), 16, torch.Generator().manual_seed(0))
    loss, logs = objective(_flow("planar"), z0)
    assert float(logs["beta"]) == pytest.approx(0.51) and loss.item() == pytest.approx(float(logs["loss"]))


def test_objectives_refuse_the_wrong_data():
    from engine.trainer import Trainer

    cfg = load_config(os.path.join(EXPERIMENTS, "toy2d_realnvp_two_moons.yaml"), ["objective.name=bpd"])
    with pytest.raises(FlowlabError, match="objective.name=bpd trains on image data, but data.name=toy2d gives vector"):
        Trainer(cfg, "unused", tensorboard=False)
    cfg = load_config(os.path.join(EXPERIMENTS, "toy2d_planar_u2.yaml"), ["data.dim=3"])
    with pytest.raises(FlowlabError, match="density on 2-D vectors: set data.dim=2"):
        Trainer(cfg, "unused", tensorboard=False)
    cfg = load_config(os.path.join(EXPERIMENTS, "toy2d_realnvp_two_moons.yaml"), ["data.hflip=true"])
    with pytest.raises(FlowlabError, match="data.hflip and data.translate augment images"):
        Trainer(cfg, "unused", tensorboard=False)


def test_energy_fit_batches_are_base_noise_seeded_by_step(tmp_path):
    """Without data the trainer's batch is the objective's draw from (seed, step, rank): the
    same on a resumed run, different between steps."""
    from engine.trainer import Trainer

    cfg = load_config(os.path.join(EXPERIMENTS, "toy2d_planar_u2.yaml"), ["model.steps=2", "train.batch_size=8"])
    a, b = (Trainer(cfg, str(tmp_path / n), tensorboard=False) for n in ("a", "b"))
    assert a._batch(3).shape == (8, 2) and torch.equal(a._batch(3), b._batch(3))
    assert not torch.equal(a._batch(3), a._batch(4))
    metrics = a.train_step(0)
    assert set(metrics) >= {"reverse_kl", "loss", "beta", "grad_norm", "lr"}


def test_figure_panels_line_up_with_the_grid(tmp_path):
    res = 16
    pts = figures.grid(res)
    assert pts.shape == (res * res, 2) and pts[0].tolist() == [-figures.BOX + 0.25, figures.BOX - 0.25]
    h = figures.histogram(pts, res)  # one point per cell: each cell of the grid counted once
    assert torch.equal(h, torch.ones(res, res))
    img = figures.figure([("a", h), ("b", torch.rand(res, res))], str(tmp_path / "f.png"), size=64)
    assert Image.open(tmp_path / "f.png").size == img.size == (2 * (64 + 6) + 6, 64 + 18 + 6)


# ---- end to end: train.py, eval.py, sample.py ---------------------------------------------------------

def test_train_py_fits_a_toy_by_maximum_likelihood(tmp_path):
    out = tmp_path / "toy"
    run([sys.executable, "train.py", "experiments/toy2d_realnvp_two_moons.yaml", "--out", str(out), "model.steps=4",
         "data.n_train=4096", "data.n_test=1024", "train.steps=80", "train.batch_size=128", "train.log_every=10",
         "train.eval_every=80", "train.sample_every=80", "train.checkpoint_every=0", "sample.n=2000",
         "eval.batch_size=512"], env=ONE_THREAD)
    test_nll, train_nll = read_metric(out, "test/nll"), read_metric(out, "train/nll")
    assert set(test_nll) == {0, 80} and test_nll[80] < test_nll[0] - 0.3, test_nll
    assert len(train_nll) == 8 and train_nll[80] < train_nll[10]
    assert (out / "samples" / "step_0000080.png").is_file() and read_metric(out, "samples/nonfinite_samples") == {80: 0}
    proc = run([sys.executable, "eval.py", str(out)], env=ONE_THREAD)
    assert f"NLL {test_nll[80]:.4f}" in proc.stdout and "objective nll" in proc.stdout  # the trainer's number


def test_train_py_fits_an_energy_by_reverse_kl(tmp_path):
    out = tmp_path / "energy"
    run([sys.executable, "train.py", "experiments/toy2d_planar_u2.yaml", "--out", str(out), "model.steps=8",
         "objective.anneal_steps=20", "train.steps=60", "train.batch_size=128", "train.log_every=10",
         "train.eval_every=60", "train.sample_every=60", "train.checkpoint_every=0", "eval.max_examples=2000",
         "sample.n=2000"], env=ONE_THREAD)
    rkl, kl = read_metric(out, "test/reverse_kl"), read_metric(out, "test/kl")
    assert set(rkl) == set(kl) == {0, 60} and rkl[60] < rkl[0] - 1.0, rkl
    assert kl[60] == pytest.approx(rkl[60] + toy2d.log_partition("u2")) and kl[60] > -0.05  # KL >= 0 up to noise
    beta = read_metric(out, "train/beta")
    assert beta[10] == pytest.approx(annealed_beta(9, 20)) and beta[60] == 1.0  # logged after step 9 (0-based)
    assert set(read_metric(out, "train/loss")) == set(read_metric(out, "train/reverse_kl")) == set(range(10, 61, 10))
    assert (out / "samples" / "step_0000060.png").is_file()
    proc = run([sys.executable, "sample.py", str(out), "--n", "500", "--out", str(tmp_path / "s.png")], env=ONE_THREAD)
    assert (tmp_path / "s.png").is_file() and "objective reverse_kl" in proc.stdout
