"""An optimizer step that is applied only where a device-side flag says the step is finite,
without reading the flag on the host (no host synchronisation in the training step).

With ``S`` the state a step may change (parameters, the optimizer's state including its step
count, the EMA's averaged weights, the model's buffers, which after-step hooks such as power
iterations update) and ``finite`` a 0-dim bool tensor on the device:

    S_new = update(S)                    (optimizer step, EMA, after-step hooks: eager, as always)
    S    <- where(finite, S_new, S_old)   elementwise, per dtype on one flat buffer

so a non-finite step leaves every tensor of ``S`` bit for bit as it was (``where`` selects,
it never mixes a NaN in).  State that the step creates (Adam's moments and step count at the
first step) is compared with zeros: for Adam, AdamW and Adamax a zero state is exactly a fresh
one (step 0, zero moments), so a skipped first step leaves the optimizer as new.  The cost is
one flat copy of ``S`` before the step and one selection after (a handful of kernels per
dtype); the flag itself is read on the host only where the trainer logs (``engine.trainer``).

On a GPU the optimizer must keep its step count on the device (``capturable``, set by
``keep_step_on_device``), else Adam reads it on the host every step.
"""
from __future__ import annotations

from typing import Callable

import torch


def keep_step_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """On CUDA: the optimizer's step counts on the parameters' device (``capturable=True``:
    no host read in Adam's bias correction), also for a state loaded from a checkpoint; on the
    CPU: the default host step count (``capturable=False``)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    on_device = device.type == "cuda"
    for group in inner.param_groups:
        if "capturable" in group:
            group["capturable"] = on_device
        for p in group["params"]:
            state = inner.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


def _step_tensors(optimizer, ema, model: torch.nn.Module) -> dict:
    """{name: tensor} of everything an update may change (names, not objects: a layer may
    replace a buffer, and the optimizer creates its state at the first step)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    out = dict(model.named_parameters())
    out.update({f"buffer:{name}": b for name, b in model.named_buffers()})
    index = {id(p): name for name, p in model.named_parameters()}
    for group in inner.param_groups:
        for i, p in enumerate(group["params"]):
            owner = index.get(id(p), f"param{i}")
            if owner not in out:
                out[owner] = p
            for key, value in inner.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"optimizer:{owner}:{key}"] = value
    if ema is not None:
        out.update({f"ema:{name}": v for name, v in ema.shadow.items()})
    return out


def _by_kind(named: dict) -> dict:
    groups: dict = {}
    for name, t in named.items():
        groups.setdefault((t.device, t.dtype), []).append((name, t))
    return groups


def guarded_update(finite: torch.Tensor, update: Callable[[], None], optimizer, model: torch.nn.Module,
                   ema=None) -> None:
    """Run ``update()`` (optimizer step, EMA update, after-step hooks), then keep its result only
    where ``finite`` (a 0-dim bool tensor) is true; see the module docstring."""
    old = {}
    for key, group in _by_kind(_step_tensors(optimizer, ema, model)).items():
        flat = torch.cat([t.detach().reshape(-1) for _, t in group])
        old.update(zip((name for name, _ in group), flat.split([t.numel() for _, t in group])))
    update()
    with torch.no_grad():
        for (device, dtype), group in _by_kind(_step_tensors(optimizer, ema, model)).items():
            tensors = [t for _, t in group]
            new = torch.cat([t.detach().reshape(-1) for t in tensors])
            prev = torch.cat([old[name] if name in old and old[name].numel() == t.numel()
                              else torch.zeros(t.numel(), device=device, dtype=dtype) for name, t in group])
            torch.where(finite.to(device), new, prev, out=new)
            torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(new.split([t.numel() for t in tensors]), tensors)])
