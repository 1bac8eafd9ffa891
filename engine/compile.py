"""``train.compile``: torch.compile of the model's forward, i.e. of the training log-likelihood

    log p(x) = sum_k ldj_k(x) + log p_base(z)      (and the auxiliary losses of that forward)

that every objective calls as ``model(batch, ...)`` (``engine.objectives``).  The optimizer
step, the EMA and the hooks stay eager.  The forward is replaced on the instance
(``model.forward``), so parameter and buffer names, checkpoints and ``model.safetensors`` are
unchanged; ``log_prob``, ``sample`` and ``encode`` (evaluation, sampling, the codec) run eagerly.

``train.compile``: ``none`` (default) | ``default`` | ``max-autotune-no-cudagraphs`` (inductor's
modes; CUDA graphs are not offered: the flows mutate buffers and draw noise in the step, which
needs checking on a GPU first).  ``train.compile_backend``: ``inductor`` (default; needs a C++
compiler on the CPU, Triton on a GPU) | ``aot_eager`` | ``eager`` (Dynamo's tracing alone, for
finding graph breaks and for fast tests).

A family whose forward Dynamo or the backend cannot compile falls back to the eager forward at
the first failing call with one ``note:`` line (the random state is put back first, so the
eager call draws the noise the compiled one would have).  Graph breaks (data-dependent Python
control flow in layers) are not failures: those pieces run eagerly between compiled graphs;
``python benchmarks/gpu_suite.py --explain`` lists them per family.
"""
from __future__ import annotations

from typing import Callable

import torch

MODES = ("none", "default", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")


# families whose forward is not worth compiling, and why (``python benchmarks/gpu_suite.py --explain``)
EAGER_FAMILIES = {
    "ffjord": "the adaptive solver (models/transforms/continuous/dopri5.py) chooses its steps on the host, "
              "by data-dependent Python control flow (with torchdiffeq: 92 graph breaks in the tiny config, "
              "and a recompilation for every new step size), and the adjoint differentiates f twice",
}


def _compile_errors() -> tuple[type, ...]:
    from torch._dynamo import exc

    return (exc.TorchDynamoException,)


class _CompiledOrEager:
    """Calls the compiled forward; at the first compile failure, says so once and calls the eager one from then on."""

    def __init__(self, compiled: Callable, eager: Callable, what: str, log: Callable[[str], None]):
        self.compiled, self.eager, self.what, self.log = compiled, eager, what, log
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        cpu_state = torch.random.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            return self.compiled(*args, **kwargs)
        except _compile_errors() as err:
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            self.failed = f"{type(err).__name__}: {first[:200]}"
            self.log(f"note: train.compile: {self.what} does not compile ({self.failed}); its forward runs eagerly")
            torch.random.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
            return self.eager(*args, **kwargs)


# why a forward under ``train.activation_memory`` other than ``store`` is not compiled
EAGER_ACTIVATION_MEMORY = ("its layers run under torch.utils.checkpoint (with a context_fn that restores buffers "
                           "after the recomputation, which Dynamo cannot trace) or invertible backprop's autograd "
                           "functions: the step's work is in them")


def compile_forward(model: torch.nn.Module, mode: str, backend: str = "inductor", what: str = "the model",
                    log: Callable[[str], None] = print, family: str | None = None,
                    activation_memory: str = "store") -> bool:
    """Compile ``model.forward`` in place (``mode`` of ``MODES``, ``backend`` of ``BACKENDS``);
    returns whether it did (``mode == "none"``: nothing happens; a family of ``EAGER_FAMILIES``
    or ``activation_memory`` other than ``store``: one note, nothing compiled).  ``uncompile``
    undoes it."""
    if mode not in MODES or backend not in BACKENDS:
        raise ValueError(f"compile mode must be one of {MODES} and backend one of {BACKENDS}, got {mode!r}, {backend!r}")
    if mode == "none":
        return False
    if family in EAGER_FAMILIES:
        log(f"note: train.compile={mode}: {what} runs eagerly: {EAGER_FAMILIES[family]}")
        return False
    if activation_memory != "store":
        log(f"note: train.compile={mode}: {what} runs eagerly under train.activation_memory={activation_memory}: "
            f"{EAGER_ACTIVATION_MEMORY}")
        return False
    eager = model.forward
    options = {} if backend != "inductor" or mode == "default" else {"mode": mode}
    compiled = torch.compile(eager, backend=backend, **options)
    model.forward = _CompiledOrEager(compiled, eager, what, log)
    return True


def _compiled(model: torch.nn.Module) -> _CompiledOrEager | None:
    """The compiled forward of ``model``, also under accelerate's mixed-precision wrapper (which
    replaces ``forward`` and keeps the one it wraps as ``_original_forward``)."""
    for name in ("forward", "_original_forward"):
        forward = model.__dict__.get(name)
        if isinstance(forward, _CompiledOrEager):
            return forward
    return None


def compile_fallback(model: torch.nn.Module) -> str | None:
    """Why the compiled forward of ``model`` fell back to eager, or None (not compiled, or compiling)."""
    forward = _compiled(model)
    return None if forward is None else forward.failed


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward runs compiled (compiled, and not fallen back to eager)."""
    forward = _compiled(model)
    return forward is not None and forward.failed is None


def uncompile(model: torch.nn.Module) -> None:
    """Back to the class's eager forward (of a model accelerate has not wrapped)."""
    model.__dict__.pop("forward", None)
