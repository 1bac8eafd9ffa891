"""What a flow keeps for its backward pass: ``train.activation_memory: store | checkpoint | invertible``.

``store`` is plain autograd: every layer's activations are kept, so memory grows with depth.

``checkpoint``: each top-level layer of ``Flow.transforms`` runs under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: only its input is kept and its
forward is recomputed in the backward pass (random streams replayed, so noise is drawn again
identically).  Memory: one tensor per top-level layer plus one layer's activations.

``invertible``: invertible backpropagation (RevNet, Gomez et al. 2017, arXiv:1707.04585 §3;
i-RevNet, Jacobsen et al. 2018, arXiv:1802.07088; MemCNN, van de Leemput et al. 2019,
arXiv:1904.04758 / the 2018 MIDL abstract).  A run of consecutive top-level layers that declare
``Transform.invertible_backprop`` is one ``torch.autograd.Function`` (a *segment*) whose forward
runs the layers without a graph and keeps only the segment's output.  Its backward walks the
layers from the last to the first: with the gradients (dL/dy_k, dL/dldj) of layer k's output,

    x_{k-1} = f_k^{-1}(y_k)                    (the layer's own closed-form inverse, no graph)
    y, ldj  = f_k(x_{k-1})                     (recomputed with a graph: one layer's activations)
    dL/dx_{k-1}, dL/dtheta_k = vjp of (y, ldj) with (dL/dy_k, dL/dldj)

so the memory of a segment does not grow with its depth.  The parameters are inputs of the
Function, so their gradients accumulate through autograd as usual (DDP's hooks, ``autograd.grad``).
Per layer the random stream (dropout in a conditioner) and the autocast state of the forward are
replayed for the inverse and the recomputation, and the layer's buffers (batch-norm running
statistics of a conditioner) are restored after them, so the model's state is what one forward
leaves.  Layers without the flag (dequantizers: noise; factor-out splits; batch-norm bijectors in
training, whose inverse needs the batch statistics; iterative inverses: residual blocks, CNFs,
mixture-logistic couplings) are checkpointed instead; ``plan`` says which layer got what.

Float32 reconstruction drifts: x_{k-1} is rebuilt from a rebuilt y_k, so the error grows with a
segment's depth (``reconstruction_errors`` measures it; ``benchmarks/activation_memory.py``).
Under no_grad (evaluation, sampling, data-dependent init) every mode is the plain forward.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from common.errors import FlowlabError
from models.core.compose import Compose
from models.core.transform import Transform

MODES = ("store", "checkpoint", "invertible")


# --- which layer may be inverted ------------------------------------------------------------
def invertible_reason(t: Transform) -> str | None:
    """Why ``t`` (a top-level layer) cannot be backpropagated by inversion, or None if it can."""
    if t.stochastic_forward:
        return "draws noise in its forward"
    if t.factors_out:
        return "factors out a latent"
    for name, m in [("", t)] + [(n, m) for n, m in t.named_modules() if n and isinstance(m, Transform)]:
        what = f"{type(m).__name__}{f' ({name})' if name else ''}"
        if not (m.bijective and m.exact_ldj):
            return f"{what} is not an exact bijection with an exact log-det"
        if not (getattr(m, "invertible_backprop", False) or isinstance(m, Compose)):
            return f"{what} declares no exact, cheap inverse (invertible_backprop)"
        if type(m).forward_aux is not Transform.forward_aux and not isinstance(m, Compose):
            return f"{what} returns auxiliary losses"
    return None


def _check_initialized(layers) -> None:
    """Data-dependent init (ActNorm) must have run before an invertible forward."""
    for t in layers:
        for m in t.modules():
            if getattr(m, "needs_data_init", False) and hasattr(m, "initialized"):
                if not (getattr(m, "_known_initialized", False) or bool(m.initialized)):
                    raise FlowlabError(f"train.activation_memory=invertible: {type(m).__name__} in {type(t).__name__} "
                                       "is not initialised; run the model's data_init(x) (the trainer does) first")


# --- replaying a layer's forward exactly --------------------------------------------------------
def _devices(x: torch.Tensor) -> list[int]:
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []


def _rng_state(x: torch.Tensor):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _devices(x)]


@contextlib.contextmanager
def _replayed(t: Transform, rng, autocast: dict, x: torch.Tensor):
    """The random stream and autocast state of ``t``'s forward; ``t``'s buffers as they were."""
    devices = _devices(x)
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(rng[0])
        for d, s in zip(devices, rng[1]):
            torch.cuda.set_rng_state(s, d)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_BuffersRestored(t))
            for device_type, (enabled, dtype) in autocast.items():
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def _autocast_state(x: torch.Tensor) -> dict:
    types = {"cpu", x.device.type}
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in types}


class _InvertibleSegment(torch.autograd.Function):
    """forward(x, context, layers, *params) -> (y, sum of ldj); keeps only y."""

    @staticmethod
    def forward(ctx, x, context, layers, *params):
        ctx.layers, ctx.rng, ctx.autocast = layers, [], _autocast_state(x)
        z, total = x, None
        for t in layers:
            ctx.rng.append(_rng_state(x))
            z, ldj = t(z, context)
            total = ldj if total is None else total + ldj
        if z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            z = z.clone()  # a view of the input (a lone reshape) must not be returned as an output
        ctx.save_for_backward(z, context)
        return z, total

    @staticmethod
    def backward(ctx, grad_z, grad_ldj):
        z, context = ctx.saved_tensors
        index = {}
        for i, p in enumerate(_params(ctx.layers)):
            index.setdefault(id(p), i)
        grads = [None] * len(index)
        grad_context = None
        for k in reversed(range(len(ctx.layers))):
            t = ctx.layers[k]
            with _replayed(t, ctx.rng[k], ctx.autocast, z), torch.no_grad():
                x = t.inverse(z, context)
            with _replayed(t, ctx.rng[k], ctx.autocast, z), torch.enable_grad():  # buffers restored after the vjp
                xi = x.detach().requires_grad_(True)
                y, ldj = t(xi, context)
                outs = [(y, grad_z), (ldj, grad_ldj)]
                outs = [(o, torch.zeros_like(o) if g is None else g.to(o.dtype)) for o, g in outs if o.requires_grad]
                own = [p for p in t.parameters() if p.requires_grad]
                wrt = [xi, *own] + ([context] if context is not None and context.requires_grad else [])
                if outs:
                    got = torch.autograd.grad([o for o, _ in outs], wrt, [g for _, g in outs], allow_unused=True)
                else:
                    got = [None] * len(wrt)
            grad_z = got[0] if got[0] is not None else torch.zeros_like(xi)
            for p, g in zip(own, got[1:1 + len(own)]):
                if g is not None:
                    i = index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i] + g
            if len(wrt) > 1 + len(own) and got[-1] is not None:
                grad_context = got[-1] if grad_context is None else grad_context + got[-1]
            z = x
        return (grad_z, grad_context, None, *grads)


def _params(layers) -> list[torch.nn.Parameter]:
    """The distinct parameters of ``layers``, in order."""
    seen, out = set(), []
    for t in layers:
        for p in t.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# --- the chain -------------------------------------------------------------------------------
class ActivationMemoryChain(Compose):
    """``Compose`` of the same layers (same names, same parameters) whose forward keeps the
    activations as ``mode`` says; ``inverse``, ``split``, ``merge`` are Compose's own."""

    def __init__(self, transforms, mode: str):
        super().__init__(list(transforms))
        if mode not in MODES:
            raise FlowlabError(f"train.activation_memory must be one of {' | '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.groups = self._group()
        self._initialized_checked = False

    def _group(self) -> list[tuple[str, list[int], str | None]]:
        """[(how, [layer indices], why-not-invertible)] in order: ``how`` is store, checkpoint or invertible."""
        groups = []
        for i, t in enumerate(self):
            if self.mode == "store":
                how, why = "store", None
            elif self.mode == "checkpoint":
                how, why = "checkpoint", None
            else:
                why = invertible_reason(t)
                how = "invertible" if why is None else "checkpoint"
            if how == "invertible" and groups and groups[-1][0] == "invertible":
                groups[-1][1].append(i)
            else:
                groups.append((how, [i], why))
        return groups

    def plan(self) -> list[str]:
        """One line per group of top-level layers: what keeps its activations, and why."""
        layers = list(self)
        lines = []
        for how, idx, why in self.groups:
            names = ", ".join(f"{i}:{type(layers[i]).__name__}" for i in idx) if len(idx) <= 3 else (
                f"{idx[0]}..{idx[-1]} ({len(idx)} layers)")
            lines.append(f"{how}: {names}" + (f" ({why})" if why else ""))
        return lines

    def forward_aux(self, x, context=None):
        if self.mode == "store" or not torch.is_grad_enabled():
            return super().forward_aux(x, context)
        layers = list(self)
        z, total, aux = x, None, {}
        for how, idx, _ in self.groups:
            if how == "invertible":
                chunk = [layers[i] for i in idx]
                if not self._initialized_checked:
                    _check_initialized(chunk)
                z, ldj = _InvertibleSegment.apply(z, context, chunk, *_params(chunk))
                total = ldj if total is None else total + ldj
                continue
            for i in idx:  # checkpoint
                z, ldj, part = checkpoint(layers[i].forward_aux, z, context, use_reentrant=False,
                                          context_fn=_buffers_restored_on_recompute(layers[i]))
                total = ldj if total is None else total + ldj
                aux.update({f"{i}.{k}": v for k, v in part.items()})
        self._initialized_checked = True
        if total is None:
            total = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return z, total, aux


class _BuffersRestored:
    """Context (re-enterable): ``t``'s buffers (running statistics) are restored on exit to what
    they were on entry, so a recomputation leaves the model's state as one forward left it."""

    def __init__(self, t: Transform):
        self.t, self.saved = t, []

    def __enter__(self):
        self.saved.append([(b, b.detach().clone()) for b in self.t.buffers()])

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in self.saved.pop():
                b.copy_(s)
        return False


def _buffers_restored_on_recompute(t: Transform):
    """``context_fn`` for ``checkpoint``: nothing in the forward, buffers restored after a recomputation."""
    return lambda: (contextlib.nullcontext(), _BuffersRestored(t))


def set_activation_memory(model, mode: str) -> list[str]:
    """Make ``model`` (a ``Flow``: anything with a ``transforms`` chain) keep its activations as
    ``mode`` says; returns the plan lines (what each group of layers uses).  Models without a chain
    (the flow-VAE) keep storing them, and say so."""
    if mode not in MODES:
        raise FlowlabError(f"train.activation_memory must be one of {' | '.join(MODES)}, got {mode!r}")
    chain = getattr(model, "transforms", None)
    if not isinstance(chain, Compose):
        return [f"store: {type(model).__name__} has no chain of transforms (activation_memory={mode} not applied)"]
    if mode == "store" and not isinstance(chain, ActivationMemoryChain):
        return ["store: every layer (plain autograd)"]
    new = ActivationMemoryChain(list(chain), mode)
    model.transforms = new
    return new.plan()


@torch.no_grad()
def reconstruction_errors(model, x: torch.Tensor, context=None) -> list[tuple[str, float]]:
    """For each invertible segment of ``model.transforms``: (its layers, max |x_rec - x|) where x is
    the segment's input and x_rec its rebuild from the output by the layers' inverses, in the
    model's dtype (the drift invertible backprop works with)."""
    chain = model.transforms
    if not isinstance(chain, ActivationMemoryChain):
        raise FlowlabError("reconstruction_errors needs a model after set_activation_memory(model, 'invertible')")
    layers, out, z = list(chain), [], x
    for how, idx, _ in chain.groups:
        if how != "invertible":
            for i in idx:
                z, _ = layers[i](z, context)
            continue
        start = z
        for i in idx:
            z, _ = layers[i](z, context)
        rec = z
        for i in reversed(idx):
            rec = layers[i].inverse(rec, context)
        out.append((f"{idx[0]}..{idx[-1]}", float((rec.double() - start.double()).abs().max())))
    return out
