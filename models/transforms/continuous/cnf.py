"""A continuous normalizing flow as a Transform (FFJORD, Grathwohl et al. 2019, arXiv:1810.01367):

    z = x + int_0^T f(z(t), t) dt,    log|det dz/dx| = int_0^T tr(df/dz)(z(t), t) dt

solved with the augmented dynamics of ``dynamics.py`` by ``dopri5.py`` (FFJORD's solver: our
own loop with torchdiffeq's step control; ``odeint_adjoint`` for O(1)-memory gradients) or,
for every other method, by torchdiffeq (``odeint`` / ``odeint_adjoint``).  ``inverse``
integrates dz/dt = f back from T to 0.  T is learnable (stored as sqrt(T), so T = s^2 > 0, as
in FFJORD) or a fixed buffer.
Train and eval mode use their own solver settings (``SolverSettings``) and trace
(Hutchinson or exact; the log-det is exact, ``exact_ldj``, when the current mode's trace
is).  In training with RNODE coefficients (arXiv:2002.02798) the regulariser states
(kinetic energy, Jacobian Frobenius norm) are integrated too, kept out of the step-size
control (as in the official code), and ``forward_aux`` returns coefficient x batch mean
of each as this call's auxiliary losses.  ``diagnostics()`` reports the evaluations of f
of the last training forward solve, of the adjoint's backward solve that followed it, of
the last inverse, and the end time T.
Under ``train.memory_format=channels_last`` the state is NHWC from the start of each solve to its
end (``use_memory_format``): the ODE net's convolutions read and write NHWC at every evaluation of
f with no conversion around them; z and the gradients come back NCHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.core.memory_format import relayout
from models.core.transform import Transform
from models.transforms.continuous.dynamics import AugmentedDynamics
from models.transforms.continuous.regularizers import REGULARIZERS
from models.transforms.continuous.trace import TRACE_TYPES, sample_noise

FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS


def _error_norm(states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Step-size control on z and dlogp only (torchdiffeq's mixed RMS norm over them).

    Detached: step sizes are not differentiated when backpropagating through the solver
    (the RMS norm of an all-zero state, e.g. dlogp under a zero-initialised last layer,
    has an infinite derivative and would turn every gradient into NaN)."""
    return torch.stack([s.detach().pow(2).mean().sqrt() for s in states[:2]]).max()


@dataclass
class SolverSettings:
    method: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    step_size: float = 0.25  # fixed-step solvers only

    def __post_init__(self):
        if self.method not in SOLVERS:
            raise ValueError(f"unknown ODE solver {self.method!r}; use one of {SOLVERS}")

    def options(self) -> dict:
        if self.method in FIXED_STEP_SOLVERS:
            return {"step_size": self.step_size}
        return {"norm": _error_norm}


class CNF(Transform):
    exact_inverse = False  # numerical ODE solve
    channels_last_net = True  # train.memory_format=channels_last: an NHWC state (use_memory_format)

    def __init__(self, net: nn.Module, end_time: float = 1.0, train_end_time: bool = True,
                 train_solver: SolverSettings | None = None, test_solver: SolverSettings | None = None,
                 trace: str = "hutchinson", trace_eval: str = "hutchinson", noise: str = "rademacher",
                 adjoint: bool = True, kinetic_energy: float = 0.0, jacobian_norm2: float = 0.0):
        super().__init__()
        for name, value in (("trace", trace), ("trace_eval", trace_eval)):
            if value not in TRACE_TYPES:
                raise ValueError(f"unknown {name} {value!r}; use one of {TRACE_TYPES}")
        if end_time <= 0:
            raise ValueError("the CNF's end time must be positive")
        if kinetic_energy < 0 or jacobian_norm2 < 0:
            raise ValueError("RNODE coefficients must be >= 0")
        self.dynamics = AugmentedDynamics(net)
        sqrt_t = torch.tensor(math.sqrt(end_time))
        if train_end_time:
            self.sqrt_end_time = nn.Parameter(sqrt_t)
        else:
            self.register_buffer("sqrt_end_time", sqrt_t)
        self.train_solver = train_solver or SolverSettings()
        self.test_solver = test_solver or self.train_solver
        self.trace_train, self.trace_eval, self.noise = trace, trace_eval, noise
        self.adjoint = adjoint
        self.coefficients = {"kinetic_energy": float(kinetic_energy), "jacobian_norm2": float(jacobian_norm2)}
        # diagnostics of the last calls (plain attributes; forward never reads them)
        self._last_solve_nfe = {"forward": 0, "backward": 0}
        self._last_inverse_nfe = 0

    @property
    def exact_ldj(self) -> bool:
        return self._trace() == "exact"

    @property
    def regularize(self) -> bool:
        return any(c > 0 for c in self.coefficients.values())

    def use_memory_format(self, memory_format: str) -> None:
        """The layout of the ODE state in every solve (``models.core.memory_format``)."""
        channels_last = memory_format == "channels_last"
        self.dynamics.state_format = torch.channels_last if channels_last else torch.contiguous_format

    def _to_state_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in the solve's layout; its gradient comes back in the caller's (NCHW)."""
        fmt = self.dynamics.state_format
        return x if fmt == torch.contiguous_format else relayout(x, fmt, torch.contiguous_format)

    def _from_state_layout(self, z: torch.Tensor) -> torch.Tensor:
        fmt = self.dynamics.state_format
        return z if fmt == torch.contiguous_format else relayout(z, torch.contiguous_format, fmt)

    def end_time(self) -> torch.Tensor:
        return self.sqrt_end_time * self.sqrt_end_time

    def _trace(self) -> str:
        return self.trace_train if self.training else self.trace_eval

    def _solve(self, func, states: tuple[torch.Tensor, ...], times: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.train_solver if self.training else self.test_solver
        adjoint = self.adjoint and torch.is_grad_enabled()
        if s.method == "dopri5":  # our own loop (dopri5.py): the reference's step control, less work around f
            from models.transforms.continuous import dopri5
            if adjoint:
                params = tuple(p for p in func.parameters() if p.requires_grad)
                return dopri5.odeint_adjoint(func, states, times[0], times[1], rtol=s.rtol, atol=s.atol,
                                             norm=_error_norm, params=params)
            return dopri5.odeint(func, states, times[0], times[1], rtol=s.rtol, atol=s.atol, norm=_error_norm)
        # imported here: torchdiffeq imports scipy (~40 MB of resident memory), which no other
        # family needs, and every config check imports every family
        from torchdiffeq import odeint, odeint_adjoint

        kwargs = {"rtol": s.rtol, "atol": s.atol, "method": s.method, "options": s.options()}
        out = (odeint_adjoint if adjoint else odeint)(func, states, times, **kwargs)
        return tuple(o[-1] for o in out)

    def _times(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        t = torch.stack([torch.zeros_like(self.sqrt_end_time), self.end_time()]).to(x.dtype)
        return t.flip(0) if reverse else t

    def integrate(self, x):
        """(z, ldj, {regulariser: per-example integral}) of one forward solve."""
        trace = self._trace()
        noise = self._to_state_layout(sample_noise(self.noise, x)) if trace == "hutchinson" else None
        func = self.dynamics.solve(trace, noise)
        regularize = self.regularize and self.training
        zeros = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        states = (self._to_state_layout(x), zeros) + ((zeros, zeros) if regularize else ())
        out = self._solve(func, states, self._times(x, reverse=False))
        func.finish_forward()  # the adjoint's backward solve, if any, comes next
        self._last_solve_nfe = func.nfe  # the same dict: the backward solve adds to it later
        return self._from_state_layout(out[0]), -out[1], dict(zip(REGULARIZERS, out[2:]))

    def forward_aux(self, x, context=None):
        z, ldj, integrals = self.integrate(x)
        aux = {name: self.coefficients[name] * value.float().mean() for name, value in integrals.items()
               if self.coefficients[name] > 0}
        return z, ldj, aux

    def forward(self, x, context=None):
        z, ldj, _ = self.integrate(x)
        return z, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        func = self.dynamics.solve()
        x = self._from_state_layout(self._solve(func, (self._to_state_layout(z),), self._times(z, reverse=True))[0])
        self._last_inverse_nfe = func.nfe["forward"]
        return x

    def nfe(self) -> dict[str, int]:
        """Evaluations of f: the last forward solve, the adjoint backward solve after it, the last inverse."""
        return {**self._last_solve_nfe, "inverse": self._last_inverse_nfe}

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        n = self.nfe()
        return {"nfe_forward": n["forward"], "nfe_backward": n["backward"], "end_time": float(self.end_time())}
