"""FFJORD (Grathwohl et al. 2019) and RNODE (Finlay et al. 2020) multiscale CNFs as Flows.

    x (integers) -> uniform dequantization -> logit(alpha + (1 - 2 alpha) x)
    for scale s = 1..S (official ODENVP, rtqichen/ffjord lib/odenvp.py):
        blocks x CNF                    (C channels)
        if s < S: squeeze -> blocks x CNF (4C channels) -> factor out half the channels to N(0, I)
    base: N(0, I)

Each CNF integrates dz/dt = f(z, t) with f an ODENet of 3x3 time-conditioned convolutions
(``hidden_dims``, softplus); see ``models.transforms.continuous.cnf``.  The official CIFAR-10
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

from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.ode_nets import LAYER_TYPES, NONLINEARITIES, ODENet
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.continuous.cnf import CNF, SOLVERS, SolverSettings
from models.transforms.continuous.trace import NOISE_TYPES, TRACE_TYPES
from models.transforms.surjections.split import Split
from models.transforms.surjections.uniform_dequantization import UniformDequantization

DEFAULTS = {
    "scales": 4,                   # ODENVP scales (squeeze + factor-out between them)
    "blocks": 2,                   # CNF blocks before and after each squeeze
    "hidden_dims": [64, 64, 64],   # hidden channels of each ODENet
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
    "dequantization": "uniform",
}

CHOICES = {
    "layer_type": LAYER_TYPES,
    "nonlinearity": tuple(NONLINEARITIES),
    "trace": TRACE_TYPES,
    "trace_eval": TRACE_TYPES,
    "noise": NOISE_TYPES,
    "solver": SOLVERS,
    "test_solver": SOLVERS,
    "dequantization": ("uniform",),
}


class StandardNormalPrior(nn.Module):
    """Prior 'net' of a factor-out to N(0, I): mean 0 and log-std 0 for every channel."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x1.shape
        return x1.new_zeros(b, 2 * self.out_channels, h, w)


def _cnf(cfg: dict, channels: int) -> CNF:
    net = ODENet(channels, cfg["hidden_dims"], conv=True, layer_type=cfg["layer_type"],
                 nonlinearity=cfg["nonlinearity"], zero_last=cfg["zero_last"])
    return CNF(net, end_time=cfg["end_time"], train_end_time=cfg["train_end_time"],
               train_solver=SolverSettings(cfg["solver"], cfg["atol"], cfg["rtol"], cfg["step_size"]),
               test_solver=SolverSettings(cfg["test_solver"], cfg["test_atol"], cfg["test_rtol"], cfg["test_step_size"]),
               trace=cfg["trace"], trace_eval=cfg["trace_eval"], noise=cfg["noise"], adjoint=cfg["adjoint"],
               kinetic_energy=cfg["kinetic_energy"], jacobian_norm2=cfg["jacobian_norm2"])


def build(cfg: dict, data_shape: tuple[int, int, int], num_bits: int) -> Flow:
    scales, blocks = cfg["scales"], cfg["blocks"]
    if scales < 1 or blocks < 1:
        raise ValueError(f"model.scales and model.blocks must be >= 1, got {scales} and {blocks}")
    if not cfg["hidden_dims"] or any(not isinstance(d, int) or d < 1 for d in cfg["hidden_dims"]):
        raise ValueError(f"model.hidden_dims must be a non-empty list of positive widths, got {cfg['hidden_dims']}")
    if cfg["end_time"] <= 0:
        raise ValueError("model.end_time must be positive")
    c, h, w = data_shape
    if h % 2 ** (scales - 1) or w % 2 ** (scales - 1):
        raise ValueError(f"image size {h}x{w} is not divisible by 2^{scales - 1} (one squeeze between scales)")
    transforms = [UniformDequantization(num_bits), Logit(cfg["logit_alpha"])]
    shape = tuple(data_shape)
    for scale in range(scales):
        transforms += [_cnf(cfg, shape[0]) for _ in range(blocks)]
        if scale < scales - 1:
            transforms.append(Squeeze())
            shape = transforms[-1].output_shape(shape)
            transforms += [_cnf(cfg, shape[0]) for _ in range(blocks)]
            keep = shape[0] // 2
            transforms.append(Split(StandardNormalPrior(shape[0] - keep), keep))
            shape = transforms[-1].output_shape(shape)
    return Flow(transforms, StandardNormal(shape), data_shape)
