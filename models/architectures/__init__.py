"""Registry of model families: each module defines ``DEFAULTS``, ``CHOICES`` and
``build(cfg, data_shape, num_bits) -> Flow``.  A new family is a new module here plus
one line in ``ARCHITECTURES``; the trainer, CLIs and config checks pick it up."""
from __future__ import annotations

import importlib

ARCHITECTURES = {
    "glow": "models.architectures.glow",
    "resflow": "models.architectures.resflow",
    "flowpp": "models.architectures.flowpp",
    "realnvp": "models.architectures.realnvp",
    "ffjord": "models.architectures.ffjord",
    "idf": "models.architectures.idf",
    "argmax": "models.architectures.argmax",
}


def architecture(name: str):
    """The module of a registered architecture (raises KeyError for unknown names)."""
    return importlib.import_module(ARCHITECTURES[name])


def build_model(model_cfg: dict, data_shape, num_bits: int):
    """Build the Flow described by a resolved ``model`` config section."""
    cfg = dict(model_cfg)
    module = architecture(cfg.pop("name"))
    return module.build(cfg, tuple(data_shape), num_bits)
