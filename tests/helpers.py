"""Reusable checks for flow layers and models (any flow family).

Every invertible layer in the project is tested with the same two checks
(the project standard: "inverse(forward(x)) == x to tolerance, and log|det J|
equal to the log-determinant of the autograd Jacobian on small inputs"):

    assert_invertible(t, x)                 inverse(forward(x)) == x  (bijections)
                                            merge(*split(x)) == x     (factor-out layers)
    assert_ldj_matches_jacobian(t, x)       forward's ldj == log|det dz/dx| per example

a count for closed-form derivatives (``models/nets/silu.py``, ``softplus.py``):

    count_second_order_passes(f, u)         passes over u's size in f's first derivative (with a
                                            graph) and its second

plus a whole-model check that training reaches every parameter:

    assert_all_parameters_get_gradient(model, loss)

the pieces of the whole-model contract every registered family is held to
(``tests/test_contract.py``), each usable on any device:

    resolve_overrides(overrides)            a resolved config from dotted overrides (as users write them)
    build_flow(cfg, shape, device, dtype)   the Flow of a resolved config, on ``device``
    perturb_zero_parameters(model)          move zero-initialised parameters off zero
    random_images(n, shape, num_bits)       integer images as the data layer hands them out (uint8)
    training_loss(model, x)                 the trainer's loss: mean bits/dim + auxiliary losses
    assert_integer_images(s, shape, bits)   what ``sample`` returns: finite integers (in [0, 2^bits - 1])
    assert_encode_decode_exact(model, x)    decode(*encode(x)) == x, bit for bit
    estimated_logdet_layers(model)          layers whose log-det is an estimate (not a noise draw)
    meta_parameter_count(cfg, shape, bits)  parameters of a build on the meta device (no memory)
    data_shape(cfg)                         (C, H, W) of a config's data set

and the plumbing of end-to-end tests that start the CLIs as users do:

    run_command(argv)                       subprocess in the repo root; fails with its output
    read_metric(run_dir, name)              {step: value} of one metric from metrics.jsonl
    SUBSET                                  the CIFAR-10 npz the tests train on (../shared's subset, else the embedded sample)

Conventions
-----------
* Transforms act on batches ``(B, C, H, W)`` and return ``(z, ldj)`` with ``ldj`` of
  shape ``(B,)`` (see ``models.core.transform``).
* Jacobians are taken per example: each example is run as a batch of one, so a
  layer that mixes examples (it should not) would show up as a mismatch.
* Use float64 for tight tolerances: build the layer under the ``float64`` fixture of
  ``tests/conftest.py`` (or call ``.double()`` on it) and pass a float64 ``x``.  The
  helpers cast ``x`` to float64 but never change the transform's dtype.  Layers
  compute ``ldj`` in at least float32 (``models.core.transform.compute_dtype``): with
  float64 inputs most keep float64, but a float32 ldj (e.g. a constant log-det built
  in float32) carries ~1e-7 relative rounding; the default tolerances allow that.
* Layers with data-dependent initialisation (ActNorm, and ActNorm inside conditioner
  networks) initialise on the first batch they see.  :func:`initialize` runs that one
  forward pass; the Jacobian helpers call it first so that the single-example passes
  below do not re-initialise the layer on one example.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Callable

import torch
from torch import nn

from data.default import default_npz
from models.core.transform import Transform

__all__ = [
    "initialize",
    "assert_invertible",
    "jacobian_logdet",
    "autograd_logdet",
    "assert_ldj_matches_jacobian",
    "assert_all_parameters_get_gradient",
    "perturb_parameters",
    "perturb_zero_parameters",
    "resolve_overrides",
    "build_flow",
    "random_images",
    "training_loss",
    "assert_integer_images",
    "PixelRangeError",
    "assert_encode_decode_exact",
    "estimated_logdet_layers",
    "meta_parameter_count",
    "data_shape",
]


@torch.no_grad()
def initialize(transform: Transform, x: torch.Tensor, context: torch.Tensor | None = None) -> None:
    """Run one forward pass on the whole batch ``x`` so data-dependent init happens now.

    Safe to call on layers without data-dependent init (it is just a forward pass) and
    on already-initialised layers (ActNorm initialises only once).
    """
    if transform.factors_out:
        transform.split(x, context)
    else:
        transform(x, context)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_invertible(transform: Transform, x: torch.Tensor, atol: float = 1e-6,
                      context: torch.Tensor | None = None) -> None:
    """Check that ``transform`` maps ``x`` forward and back to ``x`` within ``atol``.

    Honours the class flags of :class:`models.core.transform.Transform`:

    * ``factors_out`` layers (multi-scale split): ``merge(z, latent) == x`` where
      ``(z, ldj, latent) = split(x)``; ``inverse`` is stochastic there, so it is not used.
    * ``bijective`` layers: ``inverse(forward(x)) == x``; also checks the output keeps
      the batch size and has the shape ``output_shape`` promises, and that ``ldj`` has
      shape ``(B,)``.
    * anything else (surjections such as dequantization) is refused with an
      ``AssertionError``: write a layer-specific test for it instead.
    """
    initialize(transform, x, context)
    with torch.no_grad():
        if transform.factors_out:
            z, ldj, latent = transform.split(x, context)
            assert ldj.shape == (x.shape[0],), f"ldj shape {tuple(ldj.shape)}, expected ({x.shape[0]},)"
            x_rec = transform.merge(z, latent, context)
        else:
            assert transform.bijective, (
                f"{type(transform).__name__} is neither bijective nor factors_out; "
                "assert_invertible does not apply to it")
            z, ldj = transform(x, context)
            assert ldj.shape == (x.shape[0],), f"ldj shape {tuple(ldj.shape)}, expected ({x.shape[0]},)"
            expected = (x.shape[0], *transform.output_shape(tuple(x.shape[1:])))
            assert tuple(z.shape) == expected, f"output shape {tuple(z.shape)}, output_shape says {expected}"
            x_rec = transform.inverse(z, context)
    assert x_rec.shape == x.shape, f"reconstruction shape {tuple(x_rec.shape)} != input shape {tuple(x.shape)}"
    err = _max_err(x_rec, x)
    assert err <= atol, f"{type(transform).__name__}: max |inverse(forward(x)) - x| = {err:.3e} > {atol:.1e}"


def jacobian_logdet(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of ``fn`` at each example of ``x``, in float64, shape (B,).

    ``fn`` takes a batch of ONE example, shape ``(1, *x.shape[1:])``, and returns any
    tensor with as many elements as one example (it is flattened), e.g. a layer's
    output or a whole model's concatenated latents.  The Jacobian is the full
    ``D x D`` matrix from ``torch.autograd.functional.jacobian`` (so keep ``D`` small:
    a few hundred at most).  Raises ``AssertionError`` if the map is not square or the
    Jacobian is singular.
    """
    x = x.detach().double()
    shape = tuple(x.shape[1:])
    d = x[0].numel()
    out = []
    for xi in x:
        def flat(v: torch.Tensor) -> torch.Tensor:
            return fn(v.reshape(1, *shape)).reshape(-1).double()

        jac = torch.autograd.functional.jacobian(flat, xi.reshape(-1).clone())
        assert jac.shape == (d, d), f"Jacobian has shape {tuple(jac.shape)}; the map must be {d} -> {d}"
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign.item() != 0, "singular Jacobian: the map is not locally invertible here"
        out.append(logabsdet)
    return torch.stack(out)


def autograd_logdet(transform: Transform, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example log|det dz/dx| of ``transform``'s forward map from autograd, shape (B,).

    Initialises the layer on the whole batch first (data-dependent init), then
    differentiates the forward map of each example run as a batch of one, in float64.
    Only meaningful for ``bijective`` layers.
    """
    assert transform.bijective, f"{type(transform).__name__} is not bijective: its Jacobian is not square"
    initialize(transform, x.double(), context)
    return jacobian_logdet(lambda v: transform(v, context)[0], x)


def assert_ldj_matches_jacobian(transform: Transform, x: torch.Tensor, atol: float = 1e-5,
                                rtol: float = 1e-6, context: torch.Tensor | None = None) -> None:
    """Check the ``ldj`` that ``forward`` returns equals the autograd log|det J| per example.

    The tolerance is ``atol + rtol * |log|det||``; the defaults allow a float32 ldj
    (a log-det of a few hundred carries ~1e-5 of float32 rounding).  With float64 layers
    and inputs pass much tighter ones (e.g. ``atol=1e-8``).
    """
    expected = autograd_logdet(transform, x, context)
    with torch.no_grad():
        _, ldj = transform(x.double(), context)
    assert ldj.shape == expected.shape, f"ldj shape {tuple(ldj.shape)} != ({x.shape[0]},)"
    err = (ldj.double() - expected).abs()
    tol = atol + rtol * expected.abs()
    assert bool((err <= tol).all()), (
        f"{type(transform).__name__}: ldj {ldj.tolist()} != autograd log|det J| {expected.tolist()} "
        f"(max error {err.max().item():.3e})")


def count_second_order_passes(f: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor) -> int:
    """Operations with an output of u's size (passes over the activation) that the first derivative
    of f at u (with a graph) and then its second derivative run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountPasses(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.passes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.passes += isinstance(out, torch.Tensor) and out.numel() == u.numel() and func.overloadpacket not in (
                torch.ops.aten.detach, torch.ops.aten.view, torch.ops.aten.alias, torch.ops.aten.expand)
            return out

    u, w = u.detach().requires_grad_(True), torch.randn_like(u)
    y = f(u)
    with CountPasses() as mode:
        (d1,) = torch.autograd.grad(y, u, w, create_graph=True)
        torch.autograd.grad(d1.sum(), u)
    return mode.passes


def assert_all_parameters_get_gradient(model: nn.Module, loss: torch.Tensor) -> None:
    """Backpropagate ``loss`` and check every parameter's grad is present, finite, not all zero.

    Zeroes existing grads first (``set_to_none``), so the check sees only this loss.
    Parameters with ``requires_grad=False`` are ignored.

    A zero-initialised last layer (Glow's ZeroConv2d, zero-init priors) makes some
    grads exactly zero at initialisation: e.g. ZeroConv2d's ``logs`` (its output is 0,
    so d out / d logs = 0) and every weight *before* a zero conv.  Tests of freshly
    built models should first move such parameters off zero (see
    :func:`perturb_parameters`) or take an optimizer step, and say so.
    """
    model.zero_grad(set_to_none=True)
    loss.backward()
    missing, nonfinite, zero = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all():
            nonfinite.append(name)
        elif not bool((p.grad != 0).any()):
            zero.append(name)
    problems = []
    if missing:
        problems.append(f"no grad: {missing}")
    if nonfinite:
        problems.append(f"non-finite grad: {nonfinite}")
    if zero:
        problems.append(f"all-zero grad: {zero}")
    assert not problems, "; ".join(problems)


@torch.no_grad()
def perturb_parameters(module: nn.Module, std: float = 0.05, generator: torch.Generator | None = None,
                       types: tuple[type, ...] | None = None) -> None:
    """Add N(0, std^2) noise to every parameter of ``module`` (or of its submodules of ``types``).

    Use it to move zero-initialised layers (ZeroConv2d, zero-init priors) off the
    identity so that invertibility and log-det tests exercise a non-trivial map.
    """
    targets = [module] if types is None else [m for m in module.modules() if isinstance(m, types)]
    for m in targets:
        for p in m.parameters(recurse=types is None):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
            p.add_(std * noise)


@torch.no_grad()
def perturb_zero_parameters(module: nn.Module, std: float = 0.05,
                            generator: torch.Generator | None = None) -> list[str]:
    """Add N(0, std^2) noise to every parameter of ``module`` that is identically zero; returns their names.

    A generic stand-in for a few training steps: zero-initialised last layers (Glow's
    ZeroConv2d, RealNVP's and IDF's output convs, zero-init priors) pass no gradient back
    at initialisation (see :func:`assert_all_parameters_get_gradient`) and make their
    layers the identity.  Parameters that data-dependent init sets (ActNorm) are
    overwritten by it afterwards, so call this before ``data_init``.
    """
    names = [name for name, p in module.named_parameters() if p.numel() and not bool((p != 0).any())]
    params = dict(module.named_parameters())
    for name in names:
        p = params[name]
        p.add_(std * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))
    return names


# ---- whole models: the contract of every family --------------------------------------------

#: (C, H, W) of the data sets a config can name (npz files carry their own shape).
DATA_SHAPES = {"cifar10": (3, 32, 32), "cifar10_default": (3, 32, 32), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28)}


def data_shape(cfg: dict) -> tuple[int, int, int]:
    """(C, H, W) of the data set of a resolved config."""
    name = cfg["data"]["name"]
    assert name in DATA_SHAPES, f"data.name={name!r}: no known shape (npz files carry their own); add it to DATA_SHAPES"
    return DATA_SHAPES[name]


def resolve_overrides(overrides: list[str], raw: dict | None = None) -> dict:
    """A resolved config from dotted ``section.key=value`` overrides (``model.name=...`` among
    them) over ``raw``: the same parsing and validation (unknown keys, types, choices) as users' configs."""
    from engine.config import apply_overrides, resolve
    return resolve(apply_overrides(raw or {}, list(overrides)))


def build_flow(cfg: dict, shape, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               perturb: float | None = None):
    """The Flow of a resolved config for data of ``shape`` at ``cfg["data"]["n_bits"]``, built as the
    trainer builds it (on the CPU, then moved), in ``dtype`` (default: the default dtype) on ``device``.
    ``perturb``: first move zero-initialised parameters off zero (:func:`perturb_zero_parameters`)."""
    from models.architectures import build_model
    model = build_model(cfg["model"], tuple(shape), cfg["data"]["n_bits"], cfg["dequantizer"])
    if perturb:
        perturb_zero_parameters(model, std=perturb)
    return model.to(dtype or torch.get_default_dtype()).to(device)


def random_images(n: int, shape, num_bits: int = 8, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` uint8 images (the data layer's dtype) in [0, 2^num_bits - 1] on ``device``; the first is
    all 0 and the second all 2^num_bits - 1 (both ends of the range), the rest uniform."""
    x = torch.randint(0, 2 ** num_bits, (n, *shape), dtype=torch.uint8, generator=generator)
    x[0] = 0
    if n > 1:
        x[1] = 2 ** num_bits - 1
    return x.to(device)


def training_loss(model, x: torch.Tensor):
    """``(loss, log_p, aux)`` as the trainer computes them: ``loss`` = mean bits/dim of
    ``model(x, return_aux=True)`` plus every auxiliary loss (already weighted)."""
    from engine.metrics import bits_per_dim
    log_p, aux = model(x, return_aux=True)
    loss = bits_per_dim(log_p, model.num_dims).mean()
    for value in aux.values():
        loss = loss + value
    return loss, log_p, aux


class PixelRangeError(AssertionError):
    """Raised by :func:`assert_integer_images` for integer samples outside [0, 2^bits - 1] (and only then)."""


def assert_integer_images(samples: torch.Tensor, shape, num_bits: int | None = None) -> None:
    """What a family's ``sample`` returns: shape ``(n, *shape)``, finite, integer-valued, and
    (given ``num_bits``) in [0, 2^num_bits - 1], else :class:`PixelRangeError`."""
    assert tuple(samples.shape[1:]) == tuple(shape), f"sample shape {tuple(samples.shape)}, data shape {tuple(shape)}"
    assert bool(torch.isfinite(samples).all()), f"{int((~torch.isfinite(samples)).sum())} non-finite sample values"
    assert torch.equal(samples, samples.round()), "samples are not integer-valued"
    if num_bits is None:
        return
    lo, hi = samples.min().item(), samples.max().item()
    if not (0 <= lo and hi <= 2 ** num_bits - 1):
        raise PixelRangeError(f"samples span [{lo:g}, {hi:g}], outside [0, {2 ** num_bits - 1}]")


@torch.no_grad()
def assert_encode_decode_exact(model, x: torch.Tensor):
    """``decode(*encode(x)) == x`` bit for bit (integer images); returns ``(eps_top, latents)``."""
    eps, latents = model.encode(x)
    x_rec = model.decode(eps, latents)
    assert x_rec.shape == x.shape, f"decoded shape {tuple(x_rec.shape)} != {tuple(x.shape)}"
    wrong = x_rec.to(torch.float64) != x.to(torch.float64)
    assert not bool(wrong.any()), (
        f"decode(encode(x)) differs from x in {int(wrong.sum())} of {x.numel()} values "
        f"(max |error| {_max_err(x_rec, x):.3g})")
    return eps, latents


def estimated_logdet_layers(model) -> list[str]:
    """Names of the layers whose log-det is an estimate (Russian roulette, Hutchinson) in the
    model's current mode, leaving out the layers that draw noise (their term is a bound)."""
    return [name for name, t in model.layers() if not t.exact_ldj and not t.stochastic_forward]


def meta_parameter_count(cfg: dict, shape, num_bits: int | None = None) -> int:
    """Parameter count of the model of a resolved config for data of ``shape``, built on the meta
    device (shapes only: no memory, no random init, so paper-size models count in a second)."""
    from models.architectures import build_model
    with torch.device("meta"):
        model = build_model(cfg["model"], tuple(shape), cfg["data"]["n_bits"] if num_bits is None else num_bits,
                            cfg["dequantizer"])
    return sum(p.numel() for p in model.parameters())


# ---- end-to-end CLI tests ------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CIFAR-10 npz file the tests train on: the subset beside the checkout
# (../shared/data/cifar10_subset.npz) when there, else the sample embedded in the repository
# (data/sample/cifar10_sample.npz), so a bare clone runs every test (data/default.py).
SUBSET = default_npz()


def run_command(argv: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` in the repository root; with ``check``, a non-zero exit fails with its output."""
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_metric(run_dir, name: str) -> dict:
    """{step: value} of one metric from a run directory's metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if name in row:
                out[row["step"]] = row[name]
    return out
