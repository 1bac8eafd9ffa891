"""The augmented dynamics of a CNF (Chen et al. 2018; FFJORD, Grathwohl et al. 2019):

    d/dt [z, dlogp, (KE, JF)] = [f(z, t), -tr(df/dz), (0.5 mean f^2, ||df/dz||_F^2 / D)]

so that log p(z(0)) = log p(z(T)) - dlogp(T), i.e. the CNF's ldj is -dlogp(T).
With the state ``(z,)`` alone it is plain dz/dt = f (sampling, reconstruction).

The trace is Hutchinson's estimate with noise set by ``start_solve`` (fixed during a
solve) or exact.  Evaluations of f are counted per phase ("forward" solve, "backward"
adjoint solve, "inverse" solve) for the NFE diagnostics.
"""
from __future__ import annotations

import torch
from torch import nn

from models.transforms.continuous.regularizers import kinetic_energy_rate
from models.transforms.continuous.trace import exact_trace, hutchinson_trace

PHASES = ("forward", "backward", "inverse")


class AugmentedDynamics(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        # state of the current solve (plain attributes: never saved, never trained)
        self.trace, self.noise, self.phase = "exact", None, "forward"
        self.nfe = dict.fromkeys(PHASES, 0)

    def start_solve(self, phase: str, trace: str = "exact", noise: torch.Tensor | None = None) -> None:
        if trace == "hutchinson" and noise is None:
            raise ValueError("the Hutchinson trace needs its noise, drawn once per solve")
        self.phase, self.trace, self.noise = phase, trace, noise

    def reset_counts(self) -> None:
        self.nfe = dict.fromkeys(PHASES, 0)

    def forward(self, t: torch.Tensor, states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.nfe[self.phase] += 1
        z = states[0]
        if len(states) == 1:
            return (self.net(t, z),)
        outer_grad = torch.is_grad_enabled()  # off: eval, or the adjoint's forward solve
        with torch.enable_grad():
            if not (outer_grad and z.requires_grad):  # (a view made under no_grad can claim requires_grad)
                z = z.detach().requires_grad_(True)
            f = self.net(t, z)
            if self.trace == "hutchinson":
                trace, sq_jac = hutchinson_trace(f, z, self.noise, create_graph=outer_grad)
            else:
                trace, sq_jac = exact_trace(f, z, create_graph=outer_grad)
        rates = [f, -trace]
        if len(states) > 2:  # regulariser states follow
            rates += [kinetic_energy_rate(f), sq_jac]
        if not outer_grad:
            rates = [r.detach() for r in rates]
        return tuple(rates)
