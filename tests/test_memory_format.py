"""``train.memory_format``: the conditioner networks in channels_last compute the same model.

* float64: for every image family with convolutional conditioners, log p(x), every parameter
  gradient and a sample grid with ``channels_last`` equal ``contiguous``'s (to rounding), and the
  convolutions of the conditioners really run on NHWC inputs;
* derivatives of every order cross the boundary: FFJORD's Hutchinson trace (a double backward)
  and a Residual Flow's power series give the same gradients;
* switching back to ``contiguous`` removes every hook; the key is validated; the trainer and the
  runs loaded for evaluation and sampling build their model in the configured format;
* it composes with ``train.activation_memory=invertible`` and with ``train.compile`` (AOTAutograd).
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.errors import FlowlabError
from data import ImageDataset
from engine.setup import make_model
from engine.trainer import Trainer
from models.core.memory_format import channels_last_nets, set_memory_format
from tests.helpers import build_flow, random_images, resolve_overrides, training_loss
from tests.test_contract import DATA_SHAPE, TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

# the image families whose conditioners are convolutional (the vector, VAE and BNN families have none)
CONV_FAMILIES = ["argmax", "ffjord", "flowpp", "glow", "idf", "realnvp", "resflow"]


class ConvolutionInputs(TorchDispatchMode):
    """Counts the convolutions run, by whether their input had more than one channel and was NHWC."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[0].shape[1] > 1:
            self.seen["channels_last" if args[0].is_contiguous(memory_format=torch.channels_last)
                      and not args[0].is_contiguous() else "nchw"] += 1
        return func(*args, **(kwargs or {}))


# dropout masks are drawn in memory order, so they differ between the layouts: none here
NO_DROPOUT = {"flowpp": ["model.dropout=0", "dequantizer.dropout=0"], "argmax": ["dequantizer.dropout=0"]}


def _run(family: str, memory_format: str):
    """(log p, {name: grad}, samples, convolution inputs) of the family's tiny model in ``memory_format``."""
    cfg = resolve_overrides([f"model.name={family}", *TINY[family], *NO_DROPOUT.get(family, [])])
    torch.manual_seed(0)
    model = build_flow(cfg, DATA_SHAPE, dtype=torch.float64, perturb=0.05)
    x = random_images(4, DATA_SHAPE, cfg["data"]["n_bits"], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    model.data_init(x)
    names = set_memory_format(model, memory_format)
    assert bool(names) == (memory_format == "channels_last")
    with ConvolutionInputs() as convs:
        torch.manual_seed(3)
        loss, log_p, _ = training_loss(model, x)
        loss.backward()
        model.eval()
        torch.manual_seed(4)
        with torch.no_grad():
            samples = model.sample(2)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return log_p.detach(), grads, samples, convs.seen


@pytest.mark.parametrize("family", CONV_FAMILIES)
def test_channels_last_computes_the_same_model_float64(family, float64):
    log_p0, grads0, samples0, convs0 = _run(family, "contiguous")
    log_p, grads, samples, convs = _run(family, "channels_last")
    # (a few inputs are NHWC-strided on their own, e.g. permuted views in a dequantizer)
    assert convs["channels_last"] > convs0["channels_last"] and convs["nchw"] < convs0["nchw"], (convs0, convs)
    torch.testing.assert_close(log_p, log_p0, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(grads0) and grads0
    for name, g0 in grads0.items():
        err = (grads[name] - g0).abs().max().item()
        assert err <= 1e-9 * (1 + g0.abs().max().item()), f"{family}: {name} gradient off by {err:.2e}"
    torch.testing.assert_close(samples, samples0, rtol=0, atol=1e-6)


def test_contiguous_removes_the_hooks_and_calls_are_idempotent():
    cfg = resolve_overrides(["model.name=glow", *TINY["glow"]])
    model = build_flow(cfg, DATA_SHAPE)
    nets = [net for _, net in channels_last_nets(model)]
    assert nets and all(type(net).__name__ == "GlowCouplingNet" for net in nets)
    set_memory_format(model, "channels_last")
    set_memory_format(model, "channels_last")
    assert all(len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1 for net in nets)
    set_memory_format(model, "contiguous")
    assert all(not net._forward_pre_hooks and not net._forward_hooks for net in nets)
    with pytest.raises(ValueError, match="memory_format must be one of"):
        set_memory_format(model, "nhwc")


def test_the_key_is_validated_and_every_built_model_uses_it(tmp_path):
    assert resolve_overrides(["model.name=glow"])["train"]["memory_format"] == "contiguous"
    with pytest.raises(FlowlabError, match="must be one of"):
        resolve_overrides(["model.name=glow", "train.memory_format=nhwc"])
    cfg = resolve_overrides(["model.name=glow", *TINY["glow"], "train.memory_format=channels_last",
                             "train.batch_size=4", "train.init_batch_size=8"])
    hooked = lambda m: [n for n, net in channels_last_nets(m) if net._forward_pre_hooks]  # noqa: E731
    model = make_model(cfg, DATA_SHAPE, 8)  # what eval.py and sample.py load a run into
    assert hooked(model) and hooked(model) == [n for n, _ in channels_last_nets(model)]
    x = random_images(16, DATA_SHAPE, 8, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, str(tmp_path), data=ImageDataset(x, x[:4], 8, "npz", "random test images"), tensorboard=False)
    assert hooked(trainer.model) == hooked(model)
    assert bool(trainer.device_step(0)[1])  # a finite step


def _glow_grads(memory_format: str, activation_memory: str = "store", compiled: bool = False):
    from engine.compile import compile_forward, compile_fallback, uncompile
    from models.core.activation_memory import set_activation_memory

    cfg = resolve_overrides(["model.name=glow", *TINY["glow"]])
    torch.manual_seed(0)
    model = build_flow(cfg, DATA_SHAPE, perturb=0.05)
    x = random_images(4, DATA_SHAPE, 8, generator=torch.Generator().manual_seed(1))
    model.data_init(x)
    set_memory_format(model, memory_format)
    set_activation_memory(model, activation_memory)
    if compiled:
        assert compile_forward(model, "default", "aot_eager", log=lambda line: None)
    try:
        torch.manual_seed(3)
        loss, _, _ = training_loss(model, x)
        loss.backward()
        if compiled:
            assert compile_fallback(model) is None
    finally:
        if compiled:
            uncompile(model)
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("how", [{"activation_memory": "invertible"}, {"compiled": True}])
def test_channels_last_composes_with_invertible_backprop_and_compile(how):
    loss0, grads0 = _glow_grads("contiguous")
    loss, grads = _glow_grads("channels_last", **how)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


class Relayouts(TorchDispatchMode):
    """Counts the layout conversions (``contiguous(memory_format=...)`` copies) of batches of images."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.copies = batch, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.clone.default and args[0].dim() == 4 and args[0].shape[0] == self.batch \
                and args[0].shape[1] > 1 and args[0].shape[-1] > 3 and args[0].is_contiguous() != out.is_contiguous():
            self.copies += 1
        return out


@pytest.mark.parametrize("solver,rnode", [("dopri5", False), ("dopri5", True), ("rk4", False)])
def test_a_cnf_keeps_its_ode_state_nhwc_through_the_solve(solver, rnode, float64):
    """The CNF lays out its own state (no hooks on its ODE net): one conversion into NHWC and one
    back per solve, not two per evaluation of f, RNODE's regulariser states included; torchdiffeq's
    solvers (rk4), whose states are views of one flat vector, get theirs converted per evaluation
    and compute the same."""
    overrides = [f"model.solver={solver}", f"model.test_solver={solver}", "model.step_size=0.25"]
    overrides += ["model.kinetic_energy=0.01", "model.jacobian_norm2=0.01"] if rnode else []
    cfg = resolve_overrides(["model.name=ffjord", *TINY["ffjord"], *overrides])
    results = {}
    for memory_format in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = build_flow(cfg, DATA_SHAPE, dtype=torch.float64, perturb=0.05)
        x = random_images(4, DATA_SHAPE, 8, generator=torch.Generator().manual_seed(1))
        model.data_init(x)
        set_memory_format(model, memory_format)
        cnfs = [net for _, net in channels_last_nets(model)]
        assert cnfs and all(type(net).__name__ == "CNF" and not net.dynamics.net._forward_pre_hooks for net in cnfs)
        with Relayouts(batch=len(x)) as relayouts:
            torch.manual_seed(3)
            loss, log_p, _ = training_loss(model, x)
            loss.backward()
        nfe = sum(net.nfe()["forward"] + net.nfe()["backward"] for net in cnfs)
        results[memory_format] = (log_p.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        if memory_format == "channels_last" and solver == "dopri5":
            # per solve: x, the noise and z in the forward; dL/dz back and dL/dx out in the backward
            assert relayouts.copies <= 5 * len(cnfs) < nfe, (relayouts.copies, nfe)
    torch.testing.assert_close(results["channels_last"][0], results["contiguous"][0], rtol=1e-10, atol=1e-10)
    for g, g0 in zip(results["channels_last"][1], results["contiguous"][1]):
        torch.testing.assert_close(g, g0, rtol=1e-8, atol=1e-10)
