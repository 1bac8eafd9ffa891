"""RNODE regularisers (Finlay et al. 2020, "How to train your neural ODE"), integrated
along the trajectory as extra ODE states:

    kinetic energy        int_0^T 0.5 * mean_i f_i(z(t), t)^2 dt
    Jacobian Frobenius    int_0^T ||df/dz||_F^2 / D dt       (Hutchinson: mean_i (e^T J)_i^2)

Means over the D dimensions and the 1/2 follow the official code (cfinlay/ffjord-rnode
``quadratic_cost`` and ``divergence_approx``), the scale at which its coefficients
(0.01 each on CIFAR-10) were set.  Each CNF returns coefficient x batch mean of its
integrals with its forward (``CNF.forward_aux``); the objective adds them to the loss.
"""
from __future__ import annotations

import torch

REGULARIZERS = ("kinetic_energy", "jacobian_norm2")


def kinetic_energy_rate(f: torch.Tensor) -> torch.Tensor:
    """d/dt of the kinetic-energy state: 0.5 * mean_i f_i^2, shape (B,)."""
    return 0.5 * f.pow(2).mean(dim=tuple(range(1, f.dim())))
