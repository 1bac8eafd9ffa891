"""VAE with a flow posterior (models/vae/flow_vae.py) on binarized Fashion-MNIST."""
from __future__ import annotations

import math
import os

import pytest
import torch

from models.vae.flow_vae import FLOWS, FlowVAE, binarize, load_binarized_fashion_mnist
from tests.helpers import assert_all_parameters_get_gradient

HAVE_FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def data():
    if not HAVE_FMNIST:
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    train, test, _ = load_binarized_fashion_mnist(max_train=2000, max_test=64)
    return train, test


def _trained(train, flow="planar", k=4, steps=60):
    torch.manual_seed(0)
    model = FlowVAE(784, 8, 64, flow, k)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(steps):
        loss = model.loss(train[(i * 64) % 1900:(i * 64) % 1900 + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_binarize_is_a_fixed_threshold():
    img = torch.tensor([[[[0, 127, 128, 255]]]], dtype=torch.uint8)
    assert binarize(img).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_importance_estimate_is_above_the_elbo_and_tightens(data):
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
def test_posterior_flows_train_and_every_parameter_gets_a_gradient(flow, data):
    train, _ = data
    torch.manual_seed(0)
    model = FlowVAE(784, 6, 32, flow, 3)
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
    model = FlowVAE(784, 3, 16, "planar", 3).double()
    x = train[:1].double()
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
