"""The augmented dynamics of a CNF (Chen et al. 2018, arXiv:1806.07366; FFJORD, arXiv:1810.01367):

    d/dt [z, dlogp, (KE, JF)] = [f(z, t), -tr(df/dz), (0.5 mean f^2, ||df/dz||_F^2 / D)]

so that log p(z(0)) = log p(z(T)) - dlogp(T), i.e. the CNF's ldj is -dlogp(T).
With the state ``(z,)`` alone it is plain dz/dt = f (sampling, reconstruction).

``AugmentedDynamics`` owns the vector field ``net`` (and so its parameter names);
every ODE solve gets its own :class:`Solve` from ``solve(trace, noise)``: a closure
holding that solve's trace mode, its Hutchinson noise (drawn once per solve and held
fixed, so the solver integrates one smooth ODE) and its counts of evaluations of f,
split into the forward solve and the adjoint's backward solve that follows it.  Nothing
about a solve is stored on the persistent module.  Every evaluation of f runs in the
states' precision with autocast off (under ``train.mixed_precision=bf16`` too), on a state
in ``state_format`` (the CNF's memory layout; a solver that hands over views of a flat
vector, as torchdiffeq's do, gets them converted).
For a net that ``models.nets.ode_net_closed_form`` covers (FFJORD's concat convolutions with
softplus) with the Hutchinson trace and no regulariser states, f and its trace in the forward
solve, and f with the vector-Jacobian product of the adjoint's backward solve (``rates_vjp``,
offered to ``dopri5`` by ``Solve.vjp``), are written out instead of built by autograd: the same
numbers without an autograd graph per evaluation.
"""
from __future__ import annotations

import torch
from torch import nn

from models.nets import ode_net_closed_form as closed_form
from models.transforms.continuous.regularizers import kinetic_energy_rate
from models.transforms.continuous.trace import exact_trace, hutchinson_trace


class AugmentedDynamics(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.state_format = torch.contiguous_format  # set by CNF.use_memory_format
        self.by_hand = closed_form.supports(net)  # f, its trace and their product written out (below)

    def solve(self, trace: str = "exact", noise: torch.Tensor | None = None) -> "Solve":
        if trace == "hutchinson" and noise is None:
            raise ValueError("the Hutchinson trace needs its noise, drawn once per solve")
        return Solve(self, trace, noise)

    def rates(self, t: torch.Tensor, states: tuple[torch.Tensor, ...], trace: str,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        # f runs in the states' precision (float32) with autocast off, in every solve (the forward,
        # the adjoint's backward, sampling): the adaptive solver's error control at tolerances of
        # 1e-5 cannot work with bf16's 3 significant digits (dopri5 took 5x the steps under bf16)
        with torch.autocast(device_type=states[0].device.type, enabled=False):
            return self._rates(t, states, trace, noise)

    def _state(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4 and not z.is_contiguous(memory_format=self.state_format):
            z = z.contiguous(memory_format=self.state_format)
        return z

    def _written_out(self, states, trace: str) -> bool:
        """(z, dlogp) with the Hutchinson trace of a net ``ode_net_closed_form`` covers."""
        return self.by_hand and len(states) == 2 and trace == "hutchinson"

    def _rates(self, t, states, trace, noise):
        z = self._state(states[0])
        if len(states) == 1:
            return (self.net(t, z),)
        outer_grad = torch.is_grad_enabled()  # off: eval, or the adjoint's forward solve
        if not outer_grad and self._written_out(states, trace):
            f, tr = closed_form.hutchinson(self.net, t, z, noise)
            return f, -tr
        with torch.enable_grad():
            if not (outer_grad and z.requires_grad):  # (a view made under no_grad can claim requires_grad)
                z = z.detach().requires_grad_(True)
            f = self.net(t, z)
            if trace == "hutchinson":
                tr, sq_jac = hutchinson_trace(f, z, noise, create_graph=outer_grad)
            else:
                tr, sq_jac = exact_trace(f, z, create_graph=outer_grad)
        rates = [f, -tr]
        if len(states) > 2:  # regulariser states follow
            rates += [kinetic_energy_rate(f), sq_jac]
        if not outer_grad:
            rates = [r.detach() for r in rates]
        return tuple(rates)


    def rates_vjp(self, t, states, cotangents, params, trace: str, noise):
        """(rates, d/dt, d/dstates, d/dparams) of <cotangents, rates>, written out
        (``models.nets.ode_net_closed_form``), or None where autograd must do it."""
        if not self._written_out(states, trace) or not set(params) <= set(self.net.parameters()):
            return None
        with torch.autocast(device_type=states[0].device.type, enabled=False):
            z = self._state(states[0])
            c_f = cotangents[0].contiguous(memory_format=self.state_format) if z.dim() == 4 else cotangents[0]
            f, tr, d_z, d_t, grads = closed_form.hutchinson_vjp(self.net, t, z, noise, c_f, -cotangents[1])
        return (f, -tr), d_t, (d_z, torch.zeros_like(states[1])), [grads[p] for p in params]


class Solve(nn.Module):
    """The ODE function of one solve (what the solver integrates).  A module, so that the adjoint
    finds the parameters of ``net`` through it; ``finish_forward()``
    marks the end of the forward solve: later evaluations are the adjoint's backward solve."""

    def __init__(self, dynamics: AugmentedDynamics, trace: str, noise: torch.Tensor | None):
        super().__init__()
        self.dynamics = dynamics
        self.trace, self.noise = trace, noise
        self.nfe = {"forward": 0, "backward": 0}
        self._phase = "forward"

    def finish_forward(self) -> None:
        self._phase = "backward"

    def forward(self, t: torch.Tensor, states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.nfe[self._phase] += 1
        return self.dynamics.rates(t, states, self.trace, self.noise)

    def vjp(self, t, states, cotangents, params):
        """The adjoint's evaluation written out where the net allows (``AugmentedDynamics.rates_vjp``), else None."""
        out = self.dynamics.rates_vjp(t, states, cotangents, params, self.trace, self.noise)
        if out is not None:
            self.nfe[self._phase] += 1
        return out
