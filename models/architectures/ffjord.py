"""FFJORD (Grathwohl et al. 2019, arXiv:1810.01367) and RNODE (Finlay et al. 2020,
arXiv:2002.02798) multiscale CNFs as Flows.

    x (integers) -> dequantizer (``dequantizer.kind``: uniform, the paper's; variational; argmax)
    -> logit(alpha + (1 - 2 alpha) y)       (y in [0, 1); no logit after argmax)
    for scale s = 1..S (S = ``levels``; the official ODENVP, rtqichen/ffjord lib/odenvp.py):
        steps x CNF                     (C channels)
        if s < S: squeeze -> steps x CNF (4C channels) -> factor out half the channels to N(0, I)
    base: N(0, I)

Each CNF integrates dz/dt = f(z, t) with f an ODENet of 3x3 time-conditioned convolutions
(``hidden_channels``: one width per hidden layer, softplus); see ``models.transforms.continuous.cnf``.  The official CIFAR-10
model (4 scales, 2 blocks, 64-64-64 "concat" layers, learnable T per block) has
1,358,868 network weights + 14 end times = 1,358,882 parameters; RNODE (fixed T) 1,358,868.

The hooks live on the CNF layers: each returns its RNODE auxiliary losses (coefficient x
batch mean of its integrated regularisers) with its forward and reports its NFE and end
time as diagnostics.  Nothing is initialised from data, so ``Flow.data_init`` skips the
256-image ODE solve before training.
"""
from __future__ import annotations

import torch
from torch import nn

from common.ranges import above, at_least, between, each
from models.builders.dequantizer import build_dequantizer
from models.builders.stack import LayerStack
from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.ode_nets import LAYER_TYPES, NONLINEARITIES, ODENet
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.continuous.cnf import CNF, SOLVERS, SolverSettings
from models.transforms.continuous.trace import NOISE_TYPES, TRACE_TYPES
from models.transforms.surjections.split import Split

DEFAULTS = {
    "levels": 4,                   # ODENVP scales (squeeze + factor-out between them)
    "steps": 2,                    # CNF blocks before and after each squeeze
    "hidden_channels": [64, 64, 64],  # hidden channels of each ODENet layer
    "layer_type": "concat",        # concat | concatsquash
    "nonlinearity": "softplus",
    "zero_last": False,            # zero-init the last layer's weights (RNODE code: True)
    "logit_alpha": 1.0e-6,         # FFJORD 1e-6, RNODE 0.05
    "end_time": 1.0,               # T
    "train_end_time": True,        # learnable T (one per CNF block)
    "adjoint": True,               # odeint_adjoint (else backprop through the solver)
    "trace": "hutchinson",         # training: hutchinson | exact (tiny inputs only)
    "trace_eval": "hutchinson",    # eval mode
    "noise": "rademacher",         # rademacher | gaussian
    "solver": "dopri5",            # training solver ...
    "atol": 1.0e-5,
    "rtol": 1.0e-5,
    "step_size": 0.25,             # ... step of fixed-step solvers (rk4, euler, midpoint)
    "test_solver": "dopri5",       # eval-mode solver (test bits/dim, sampling)
    "test_atol": 1.0e-5,
    "test_rtol": 1.0e-5,
    "test_step_size": 0.25,
    "kinetic_energy": 0.0,         # RNODE coefficient of int 0.5 mean f^2 dt
    "jacobian_norm2": 0.0,         # RNODE coefficient of int ||df/dz||_F^2 / D dt
}

RANGES = {  # valid values of the numeric keys (engine.config checks them)
    "levels": at_least(1), "steps": at_least(1), "hidden_channels": each(at_least(1), min_length=1),
    "logit_alpha": between(0, 0.5, hi_open=True), "end_time": above(0),
    "atol": above(0), "rtol": above(0), "step_size": above(0),
    "test_atol": above(0), "test_rtol": above(0), "test_step_size": above(0),
    "kinetic_energy": at_least(0), "jacobian_norm2": at_least(0),
}

CHOICES = {
    "layer_type": LAYER_TYPES,
    "nonlinearity": tuple(NONLINEARITIES),
    "trace": TRACE_TYPES,
    "trace_eval": TRACE_TYPES,
    "noise": NOISE_TYPES,
    "solver": SOLVERS,
    "test_solver": SOLVERS,
}

DEQUANTIZERS = ("uniform", "variational", "argmax")


class StandardNormalPrior(nn.Module):
    """Prior 'net' of a factor-out to N(0, I): mean 0 and log-std 0 for every channel."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x1.shape
        return x1.new_zeros(b, 2 * self.out_channels, h, w)


def _cnf(cfg: dict, channels: int) -> CNF:
    net = ODENet(channels, cfg["hidden_channels"], conv=True, layer_type=cfg["layer_type"],
                 nonlinearity=cfg["nonlinearity"], zero_last=cfg["zero_last"])
    return CNF(net, end_time=cfg["end_time"], train_end_time=cfg["train_end_time"],
               train_solver=SolverSettings(cfg["solver"], cfg["atol"], cfg["rtol"], cfg["step_size"]),
               test_solver=SolverSettings(cfg["test_solver"], cfg["test_atol"], cfg["test_rtol"], cfg["test_step_size"]),
               trace=cfg["trace"], trace_eval=cfg["trace_eval"], noise=cfg["noise"], adjoint=cfg["adjoint"],
               kinetic_energy=cfg["kinetic_energy"], jacobian_norm2=cfg["jacobian_norm2"])


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int, dequantizer: dict) -> Flow:
    levels, steps = cfg["levels"], cfg["steps"]
    if levels < 1 or steps < 1:
        raise ValueError(f"model.levels and model.steps must be >= 1, got {levels} and {steps}")
    widths = cfg["hidden_channels"]
    if not widths or any(not isinstance(d, int) or d < 1 for d in widths):
        raise ValueError(f"model.hidden_channels must be a non-empty list of positive widths, got {widths}")
    if cfg["end_time"] <= 0:
        raise ValueError("model.end_time must be positive")
    _, h, w = data_shape
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ValueError(f"image size {h}x{w} is not divisible by 2^{levels - 1} (one squeeze between levels)")
    stack = LayerStack(data_shape).add(build_dequantizer(dequantizer, data_shape, num_bits))
    if dequantizer["kind"] != "argmax":  # argmax gives unbounded reals already
        stack.add(Logit(cfg["logit_alpha"]))
    for level in range(levels):
        stack.add(*[_cnf(cfg, stack.shape[0]) for _ in range(steps)])
        if level < levels - 1:
            stack.add(Squeeze())
            stack.add(*[_cnf(cfg, stack.shape[0]) for _ in range(steps)])
            c = stack.shape[0]
            keep = c // 2
            stack.add(Split(StandardNormalPrior(c - keep), keep))
    transforms, shape = stack.transforms, stack.shape
    return Flow(transforms, StandardNormal(shape), data_shape)
