"""Building the pieces a run needs from a resolved config: data, model, optimizer, objective.

Each takes a :class:`engine.sections.RunConfig` (or the resolved dict, viewed as one).
"""
from __future__ import annotations

import torch

from data import VECTOR_LOADERS, load_dataset
from common.errors import FlowlabError
from engine.objectives import Objective, build_objective
from engine.sections import RunConfig
from models.architectures import build_model
from models.core.memory_format import set_memory_format


def load_data(cfg: RunConfig | dict):
    """The ``data`` section's data set: an ``ImageDataset`` (integer images) or, for the vector
    data sets (``data.name=toy2d`` with ``data.toy``, ``data.n_train``, ``data.n_test``;
    ``data.name=none`` with ``data.dim``), a ``VectorDataset``."""
    d = RunConfig.of(cfg).data
    if d.name in VECTOR_LOADERS:
        if d.hflip or d.translate > 0:
            raise FlowlabError(f"data.hflip and data.translate augment images; data.name={d.name} holds vectors")
        return load_dataset(d.name, max_train=d.max_train, max_test=d.max_test, toy=d.toy, n_train=d.n_train,
                            n_test=d.n_test, dim=d.dim)
    return load_dataset(d.name, root=d.root, path=d.path, download=d.download, n_bits=d.n_bits,
                        max_train=d.max_train, max_test=d.max_test,
                        image_options={"version": d.version, "image_size": d.image_size, "center_crop": d.center_crop,
                                       "test_fraction": d.test_fraction, "split_seed": d.split_seed})


def make_model(cfg: RunConfig | dict, data_shape, num_bits: int):
    """The model of ``cfg.model``, its conditioner networks in ``train.memory_format``."""
    cfg = RunConfig.of(cfg)
    try:
        model = build_model(cfg.model, data_shape, num_bits, cfg.dequantizer)
    except ValueError as e:
        raise FlowlabError(f"cannot build model '{cfg.model['name']}' for data of shape {tuple(data_shape)}: {e}") from None
    set_memory_format(model, cfg.train.memory_format)
    return model


def make_optimizer(cfg: RunConfig | dict, params) -> torch.optim.Optimizer:
    t = RunConfig.of(cfg).train
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}
    return kinds[t.optimizer](params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)


def make_objective(cfg: RunConfig | dict) -> Objective:
    """The training objective of ``objective.name`` (``engine.objectives.OBJECTIVES``)."""
    return build_objective(RunConfig.of(cfg).objective)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
