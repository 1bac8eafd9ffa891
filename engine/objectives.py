"""Training objectives: ``objective(model, batch) -> (loss, logs)``.

The trainer calls the objective for the loss and nothing else (as EDM's ``loss_fn(net,
images)``): ``model`` is the (possibly DDP-wrapped) network, ``batch`` this process's
micro-batch; ``loss`` is the scalar to minimise and ``logs`` a dict of detached scalars
that the trainer averages over micro-batches and ranks and records as ``train/<name>``.

The config's top-level ``objective`` section selects one: ``objective.name`` (default
``bpd``) is a key of :data:`OBJECTIVES`, and the other keys of the section are the class's
``DEFAULTS`` (its own knobs, checked like model keys) passed to its constructor.  A new
objective is a new class here and one registry line.
"""
from __future__ import annotations

import math

import torch

from engine.metrics import bits_per_dim


def auxiliary_totals(aux: dict) -> dict:
    """Auxiliary losses summed by their own name over layers ("transforms.3.kinetic_energy"
    and "transforms.5.kinetic_energy" -> "kinetic_energy"), detached for logging."""
    out = {}
    for name, value in aux.items():
        key = name.rsplit(".", 1)[-1]
        out[key] = out.get(key, 0.0) + value.detach().float()
    return out


class Objective:
    """Base class: ``DEFAULTS`` are the config keys ``objective.<key>`` (constructor
    arguments) with their defaults, ``CHOICES`` their allowed values where restricted."""

    DEFAULTS: dict = {}
    CHOICES: dict = {}

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class BitsPerDim(Objective):
    """Maximum likelihood in bits per dimension, plus the model's auxiliary losses:

        loss = mean_b [ -log p(x_b) / (D ln 2) ] + sum_l aux_l

    with ``log p(x), aux = model(x, return_aux=True)`` (every likelihood term inside
    ``log p``; ``aux`` the weighted regularisers returned by that very forward, e.g. RNODE's
    kinetic energy and Jacobian norm per CNF block) and D = C·H·W of the data batch.
    ``logs``: ``bpd`` and ``aux/<name>`` (summed by name over layers)."""

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        log_prob, aux = model(batch, return_aux=True)
        bpd = bits_per_dim(log_prob, math.prod(batch.shape[1:])).mean()
        loss = bpd
        for value in aux.values():
            loss = loss + value
        logs = {"bpd": bpd.detach(), **{f"aux/{k}": v for k, v in auxiliary_totals(aux).items()}}
        return loss, logs


OBJECTIVES = {"bpd": BitsPerDim}
DEFAULT_OBJECTIVE = "bpd"


def build_objective(section: dict) -> Objective:
    """The objective of a resolved ``objective`` section (``name`` plus the class's knobs)."""
    knobs = {k: v for k, v in section.items() if k != "name"}
    return OBJECTIVES[section["name"]](**knobs)
