"""``train.activation_memory``: checkpointing and invertible backprop give plain backprop's gradients.

* float64, tight: with ``checkpoint`` and ``invertible`` the loss, every parameter gradient and every
  buffer after the step equal ``store``'s on a small multi-scale Glow (ActNorm in the coupling
  nets, splits), RealNVP (batch-norm bijectors: checkpointed; batch norm in the conditioners) and
  Flow++ with affine couplings (dropout 0.2 in the conditioners: the random stream is replayed);
* float32: Glow's gradients within a stated tolerance of store's (reconstruction drifts);
* invertible backprop keeps the same saved activations whatever the depth, plain autograd does not;
* layers without a closed-form inverse fall back to checkpoint, and the plan says so;
* the trainer runs with ``train.activation_memory=invertible`` (same first steps as store);
* an unknown mode is a one-line error.
"""
from __future__ import annotations

import pytest
import torch

from common.errors import FlowlabError
from data import ImageDataset
from engine.config import load_config
from models.core.activation_memory import reconstruction_errors, set_activation_memory
from tests.helpers import ROOT, build_flow, random_images, resolve_overrides, training_loss

SHAPE = (3, 8, 8)
SMALL = {
    "glow": ["model.name=glow", "model.levels=2", "model.steps=2", "model.hidden_channels=8"],
    "realnvp": ["model.name=realnvp", "model.levels=2", "model.hidden_blocks=1", "model.hidden_channels=8"],
    "flowpp-affine": ["model.name=flowpp", "model.steps=[1,1,1]", "model.hidden_channels=8", "model.hidden_blocks=1",
                      "model.heads=2", "model.components=0", "model.dropout=0.2", "dequantizer.steps=1",
                      "dequantizer.hidden_channels=8", "dequantizer.hidden_blocks=1", "dequantizer.heads=2",
                      "dequantizer.components=0", "dequantizer.context_channels=4", "dequantizer.context_blocks=1"],
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is many times faster on a shared CPU."""


def _plan(overrides) -> list[str]:
    return set_activation_memory(build_flow(resolve_overrides(overrides), SHAPE), "invertible")


def _step(overrides, mode, dtype=torch.float64, n=4):
    """(loss, {name: grad}, {name: buffer}, plan, model) of one training backward with ``mode``."""
    cfg = resolve_overrides(overrides)
    torch.manual_seed(0)
    model = build_flow(cfg, SHAPE, dtype=dtype, perturb=0.05)
    x = random_images(n, SHAPE, cfg["data"]["n_bits"], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    model.data_init(x)
    plan = set_activation_memory(model, mode)
    torch.manual_seed(3)
    loss, _, _ = training_loss(model, x)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    return loss.detach(), grads, buffers, plan, model


@pytest.mark.parametrize("case", sorted(SMALL))
def test_checkpoint_and_invertible_give_plain_backprops_gradients_float64(case, float64):
    loss0, grads0, buffers0, _, _ = _step(SMALL[case], "store")
    assert all(g is not None for g in grads0.values())
    for mode in ("checkpoint", "invertible"):
        loss, grads, buffers, plan, _ = _step(SMALL[case], mode)
        assert torch.equal(loss, loss0), (mode, loss.item(), loss0.item())
        assert set(grads) == set(grads0)
        for name, g0 in grads0.items():
            g = grads[name]
            assert g is not None, f"{mode}: no gradient for {name}"
            err = (g - g0).abs().max().item()
            assert err <= 1e-10 * (1 + g0.abs().max().item()), f"{mode}: {name} gradient off by {err:.2e}"
        for name, b0 in buffers0.items():  # running statistics: one forward's update, not three
            assert torch.equal(buffers[name], b0), f"{mode}: buffer {name} changed by the recomputation"
        if mode == "invertible":
            assert any(line.startswith("invertible:") for line in plan), plan


def test_glow_float32_gradients_within_tolerance():
    """float32: the rebuilt inputs drift by rounding, so gradients agree to 1e-5 of their scale (measured: 2e-7)."""
    _, grads0, _, _, _ = _step(SMALL["glow"], "store", dtype=torch.float32)
    _, grads, _, _, _ = _step(SMALL["glow"], "invertible", dtype=torch.float32)
    scale = max(g.abs().max().item() for g in grads0.values())
    worst = max((grads[k] - g).abs().max().item() for k, g in grads0.items())
    assert worst <= 1e-5 * scale, f"max gradient difference {worst:.2e} vs scale {scale:.2e}"


def test_glow_plan_inverts_every_step_and_rebuilds_inputs_exactly(float64):
    """Every ActNorm / 1x1 conv / coupling of Glow is in an invertible segment; the dequantizer
    (noise) and the split (a factored-out latent) are checkpointed; float64 rebuilds to 1e-12."""
    _, _, _, plan, model = _step(SMALL["glow"], "invertible")
    assert plan[0].startswith("checkpoint: 0:UniformDequantization (draws noise")
    assert any(line.startswith("checkpoint:") and "Split (factors out a latent)" in line for line in plan)
    groups = model.transforms.groups
    layers = list(model.transforms)
    for how, idx, _ in groups:
        for i in idx:
            if type(layers[i]).__name__ in ("ActNorm", "InvertibleConv1x1", "AffineCoupling"):
                assert how == "invertible", (i, type(layers[i]).__name__, plan)
    x = torch.rand(3, *SHAPE, dtype=torch.float64) - 0.5
    errors = reconstruction_errors(model, x)
    assert len(errors) == 2 and all(e < 1e-12 for _, e in errors), errors


def _saved_bytes(steps: int, mode: str) -> int:
    """Bytes of the tensors autograd saves in one training forward of a one-level Glow of ``steps`` steps."""
    cfg = resolve_overrides(["model.name=glow", "model.levels=1", f"model.steps={steps}", "model.hidden_channels=8"])
    torch.manual_seed(0)
    model = build_flow(cfg, SHAPE)
    x = random_images(4, SHAPE)
    model.data_init(x)
    set_activation_memory(model, mode)
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = training_loss(model, x)
    loss.backward()
    return sum(seen.values())


def test_invertible_saved_activations_do_not_grow_with_depth():
    store = [_saved_bytes(k, "store") for k in (2, 6)]
    invertible = [_saved_bytes(k, "invertible") for k in (2, 6)]
    assert store[1] > 2 * store[0], store
    assert invertible[0] == invertible[1], invertible
    assert invertible[1] < store[1] / 4, (invertible, store)


def test_layers_without_a_closed_form_inverse_fall_back_to_checkpoint():
    """RealNVP's batch-norm bijector (its inverse needs the batch statistics) and Flow++'s
    logistic-mixture coupling (bisection) are checkpointed under invertible, and the plan says why."""
    plan = _plan(SMALL["realnvp"])
    bn = [line for line in plan if "BatchNormBijection" in line]
    assert bn and all(line.startswith("checkpoint:") and "declares no exact, cheap inverse" in line for line in bn), plan
    assert any(line.startswith("invertible:") and "MaskedAffineCoupling" in line for line in plan), plan
    mixture = SMALL["flowpp-affine"][:5] + ["model.components=2"] + SMALL["flowpp-affine"][6:]
    plan = _plan(mixture)
    assert any(line.startswith("checkpoint:") and "MixtureLogisticCoupling" in line for line in plan), plan


def test_unknown_mode_is_a_one_line_error():
    with pytest.raises(FlowlabError, match=r"train.activation_memory' must be one of \['store', 'checkpoint', "
                                           r"'invertible'\], got 'reversible'") as err:
        resolve_overrides(["model.name=glow", "train.activation_memory=reversible"])
    assert "\n" not in str(err.value)
    model = build_flow(resolve_overrides(SMALL["glow"]), SHAPE)
    with pytest.raises(FlowlabError, match="must be one of store | checkpoint | invertible"):
        set_activation_memory(model, "recompute")


def test_trainer_with_invertible_takes_the_same_steps_as_store(tmp_path, one_thread):
    from engine.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=gen)
    data = ImageDataset(x, x[:8], 8, "random", "random uint8 images (test)")
    runs = {}
    for mode in ("store", "invertible"):
        cfg = load_config(f"{ROOT}/experiments/glow_small.yaml",
                          ["model.levels=2", "model.steps=2", "model.hidden_channels=16", "train.batch_size=8",
                           "train.init_batch_size=16", "train.warmup_steps=0", f"train.activation_memory={mode}"])
        trainer = Trainer(cfg, str(tmp_path / mode), data=data, tensorboard=False)
        runs[mode] = ([trainer.train_step(s) for s in range(3)], trainer.memory_plan)
    (store, _), (inv, plan) = runs["store"], runs["invertible"]
    assert any(line.startswith("invertible:") for line in plan), plan
    for a, b in zip(store, inv):
        assert a is not None and b is not None
        assert float(b["bpd"]) == pytest.approx(float(a["bpd"]), rel=1e-5)
        assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-3)
