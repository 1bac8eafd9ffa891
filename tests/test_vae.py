"""The flow-VAE (models/vae/flow_vae.py, the flow_vae family, the elbo objective) on small
synthetic binary images generated here, so every test runs on every machine; end to end
through train.py / eval.py / sample.py on a tiny .npz binarized by ``data.n_bits=1``, and
scripts/vae_flow_table.py.  The real Fashion-MNIST runs are experiments
(experiments/vae_planar_fashion_mnist.yaml)."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from common.errors import FlowlabError
from data import load_dataset
from engine.config import apply_overrides, load_config, load_yaml, resolve
from engine.objectives import NegativeELBO
from models.architectures import architecture, build_model
from models.vae.flow_vae import FLOWS, FlowVAE
from tests.helpers import ROOT, assert_all_parameters_get_gradient, read_metric
from tests.helpers import run_command as run

SIDE = 14  # synthetic images are 1 x 14 x 14
X_DIM = SIDE * SIDE
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CONFIG = os.path.join(ROOT, "experiments", "vae_planar_fashion_mnist.yaml")


def binary_images(n: int, seed: int = 0, prototypes: int = 6, flip: float = 0.05) -> np.ndarray:
    """uint8 (n, SIDE, SIDE) images in {0, 255}: one of a few random binary prototypes (fixed by
    the seed 1234 of the prototype generator) with a fraction ``flip`` of the pixels flipped."""
    protos = np.random.default_rng(1234).random((prototypes, SIDE, SIDE)) > 0.5
    rng = np.random.default_rng(seed)
    x = protos[rng.integers(0, prototypes, n)] ^ (rng.random((n, SIDE, SIDE)) < flip)
    return (255 * x).astype(np.uint8)


def write_npz(path, n_train: int = 512, n_test: int = 64) -> str:
    np.savez(path, x_train=binary_images(n_train, 0), x_test=binary_images(n_test, 1))
    return str(path)


@pytest.fixture(scope="module")
def data():
    """(train, test) binary images as the loaders give them: uint8 (N, 1, SIDE, SIDE) in {0, 1}."""
    train, test = (torch.from_numpy(binary_images(n, s) // 255)[:, None] for n, s in ((2000, 0), (64, 1)))
    return train, test


def _trained(train, flow="planar", k=4, steps=60):
    torch.manual_seed(0)
    model = FlowVAE(X_DIM, 8, 64, flow, k, data_shape=(1, SIDE, SIDE))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(steps):
        loss = model.loss(train[(i * 64) % 1900:(i * 64) % 1900 + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_n_bits_1_binarizes_at_128(tmp_path):
    x = np.array([[[0, 127, 128, 255]]], dtype=np.uint8)
    np.savez(tmp_path / "b.npz", x_train=x, x_test=x)
    ds = load_dataset("npz", path=str(tmp_path / "b.npz"), n_bits=1)
    assert ds.train.reshape(-1).tolist() == [0, 0, 1, 1] and ds.n_bits == 1


def test_importance_estimate_is_above_the_elbo_and_tightens(data, one_thread):
    train, test = data
    model = _trained(train)
    torch.manual_seed(1)
    elbo = torch.stack([model.elbo(test) for _ in range(20)]).mean(0)  # E_q[log w] per example
    is_4 = model.importance_log_px(test, 4)
    is_64 = model.importance_log_px(test, 64)
    is_512 = model.importance_log_px(test, 512, chunk=128)
    # means over 64 test images: ELBO < IS(4) < IS(64) < IS(512) (all lower bounds on log p(x))
    assert elbo.mean() < is_4.mean() < is_64.mean() < is_512.mean(), (elbo.mean(), is_4.mean(), is_64.mean(), is_512.mean())
    assert (is_512 > elbo).float().mean() > 0.9
    # S = 1 is the ELBO itself (same noise)
    torch.manual_seed(7)
    a = model.importance_log_px(test, 1)
    torch.manual_seed(7)
    assert torch.allclose(a, model.elbo(test), atol=1e-4)


@pytest.mark.parametrize("flow", FLOWS)
def test_posterior_flows_train_and_every_parameter_gets_a_gradient(flow, data, one_thread):
    train, _ = data
    torch.manual_seed(0)
    model = FlowVAE(X_DIM, 6, 32, flow, 3)
    # one optimizer step first: the amortisers start small and the MADE output is near zero
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = train[:64]
    for _ in range(2):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_all_parameters_get_gradient(model, model.loss(x))
    z, log_q = model.posterior(x[:5], samples=3)
    assert z.shape == (3, 5, 6) and log_q.shape == (3, 5) and torch.isfinite(log_q).all()


def test_flow_log_q_is_the_change_of_variables(data):
    """log q_K(z_K) from the model equals log q_0(z_0) - log|det dz_K/dz_0| computed by autograd."""
    train, _ = data
    torch.manual_seed(0)
    model = FlowVAE(X_DIM, 3, 16, "planar", 3).double()
    x = train[:1].double().reshape(1, -1)
    h = model.encoder(x)
    mu, log_std = model.enc_out(h).chunk(2, dim=1)

    def push(z0):
        z = z0.reshape(1, 3)
        for t in model.flows:
            z, _ = t(z, h)
        return z.reshape(3)

    torch.manual_seed(3)
    z_k, log_q = model.posterior(x, samples=1)
    torch.manual_seed(3)
    eps = torch.randn(1, 1, 3, dtype=torch.float64)
    z0 = (mu + torch.exp(log_std) * eps).reshape(3)
    jac = torch.autograd.functional.jacobian(push, z0)
    log_q0 = (-0.5 * math.log(2 * math.pi) - log_std - 0.5 * eps[0] ** 2).sum()
    assert torch.allclose(push(z0), z_k.reshape(3))
    assert torch.allclose(log_q.reshape(()), log_q0 - torch.linalg.slogdet(jac)[1], atol=1e-8)


# ---- the family, the objective and the hooks --------------------------------------------------------

def _family(**keys):
    return build_model({"name": "flow_vae", **architecture("flow_vae").DEFAULTS, "latent_dim": 4,
                        "hidden_channels": 16, **keys}, (1, SIDE, SIDE), 1, {"kind": "none"})


def test_family_builds_the_posterior_from_the_shared_layers():
    from models.builders.vector_layers import vector_layers

    for flow, layer in [("planar", "PlanarFlow"), ("radial", "RadialFlow"), ("iaf", "MAF"), ("sylvester", "SylvesterFlow")]:
        model = _family(flow=flow, steps=3)
        assert [type(t).__name__ for t in model.flows] == [layer] * 3 and model.data_shape == (1, SIDE, SIDE)
    a = _family(flow="iaf", steps=2)  # the builder's MAF layers with the encoder's hidden layer as context
    ref = vector_layers("maf", 4, 2, hidden_channels=16, hidden_blocks=2, context_features=16)
    assert [tuple(p.shape) for p in a.flows.parameters()] == [tuple(p.shape) for t in ref for p in t.parameters()]
    assert load_config(CONFIG)["dequantizer"] == {"kind": "none"}
    with pytest.raises(ValueError, match=r"needs binary images \(data.n_bits=1\)"):
        build_model({"name": "flow_vae", **architecture("flow_vae").DEFAULTS}, (1, 28, 28), 8, {"kind": "none"})


def test_elbo_objective_is_the_annealed_negative_elbo(data):
    train, _ = data
    model, x = _family(steps=2), train[:16]
    objective = NegativeELBO(anneal_steps=100)
    objective.start_step(50)
    torch.manual_seed(5)
    loss, logs = objective(model, x)
    torch.manual_seed(5)
    assert loss.item() == pytest.approx(model.loss(x, beta=0.51).item(), rel=1e-6)
    assert float(logs["nelbo"]) == pytest.approx(float(logs["recon"]) + float(logs["kl"]), rel=1e-5)
    assert float(logs["beta"]) == pytest.approx(0.51) and not logs["nelbo"].requires_grad
    objective.start_step(10_000)
    assert objective.beta == 1.0


def test_the_vae_answers_the_trainer_hooks(data):
    train, _ = data
    model, x = _family(steps=2), train[:8]
    model.data_init(x)
    model.after_optimizer_step()
    assert model.diagnostics() == {} and model.diagnostics_summary() == {}
    stats = model.layer_stats(x)
    assert "q0/std_mean" in stats and "flows.1.PlanarFlow/ldj_mean" in stats
    assert model.find_nonfinite(x) is None
    with torch.no_grad():
        model.flows[1].w.fill_(float("nan"))
    assert model.find_nonfinite(x) == "flows.1.w: non-finite parameter"
    assert model.sample(3).shape == (3, 1, SIDE, SIDE) and set(model.sample(3).unique().tolist()) <= {0.0, 1.0}


def test_objectives_and_models_must_match(tmp_path):
    from engine.trainer import Trainer

    npz = write_npz(tmp_path / "bin.npz", 64, 16)
    tiny = ["data.name=npz", f"data.path={npz}", "model.latent_dim=4", "model.hidden_channels=16", "train.batch_size=8"]
    raw = apply_overrides(load_yaml(CONFIG), tiny)
    with pytest.raises(FlowlabError, match="objective.name=bpd needs a flow"):
        Trainer(resolve({**raw, "objective": {"name": "bpd"}}), str(tmp_path / "a"), tensorboard=False)
    with pytest.raises(FlowlabError, match="needs binary images"):
        Trainer(load_config(CONFIG, tiny + ["data.n_bits=8"]), str(tmp_path / "b"), tensorboard=False)


# ---- end to end ---------------------------------------------------------------------------------------

TINY = ["model.latent_dim=4", "model.hidden_channels=32", "model.steps=2", "train.batch_size=32", "train.log_every=10",
        "train.checkpoint_every=0", "objective.anneal_steps=20", "eval.iw_samples=16", "eval.iw_chunk=8",
        "eval.batch_size=64", "sample.n=8"]


def test_train_py_trains_a_tiny_vae_on_generated_binary_images(tmp_path):
    npz, out = write_npz(tmp_path / "bin.npz"), tmp_path / "vae"
    run([sys.executable, "train.py", CONFIG, "--out", str(out), "data.name=npz", f"data.path={npz}", *TINY,
         "train.steps=60", "train.eval_every=60", "train.sample_every=60"], env=ONE_THREAD)
    nelbo, nll = read_metric(out, "test/nelbo"), read_metric(out, "test/nll_is")
    assert set(nelbo) == set(nll) == {0, 60} and nelbo[60] < nelbo[0] - 5, nelbo
    assert all(nll[s] <= nelbo[s] + 1.0 for s in (0, 60)), (nll, nelbo)  # IS(16) is the tighter bound
    assert read_metric(out, "train/beta")[60] == 1.0 and set(read_metric(out, "train/kl")) == set(range(10, 61, 10))
    assert (out / "samples" / "step_0000060.png").is_file()
    proc = run([sys.executable, "eval.py", str(out), "--iw-samples", "32"], env=ONE_THREAD)
    assert "-ELBO" in proc.stdout and "IS, S=32" in proc.stdout and "objective elbo" in proc.stdout


def test_vae_flow_table_trains_each_k_through_the_trainer(tmp_path, capsys, one_thread):
    from scripts import vae_flow_table

    npz = write_npz(tmp_path / "bin.npz", 256, 32)
    rows = vae_flow_table.main([CONFIG, "--k", "0", "2", "--out", str(tmp_path / "table"), "data.name=npz",
                                f"data.path={npz}", *TINY, "train.steps=20", "train.eval_every=20",
                                "train.sample_every=0"])
    assert [r["k"] for r in rows] == [0, 2] and all(r["steps"] == 20 for r in rows)
    assert all(math.isfinite(r["nelbo"]) and math.isfinite(r["nll_is"]) for r in rows)
    assert os.path.isfile(tmp_path / "table" / "k2" / "checkpoint.pt")
    out = capsys.readouterr().out
    assert "| K (planar) |" in out and "| 0 |" in out and "| 2 |" in out and "89.9" in out
