"""Registry of model families.  Each module defines ``DEFAULTS`` and ``CHOICES`` (its
``model`` section), ``DEQUANTIZERS`` (the ``dequantizer.kind`` values it supports, the
first its default; ``("none",)`` for a discrete family), optionally
``DEQUANTIZER_DEFAULTS`` (its own defaults for the dequantizer's knobs), ``RANGES`` (valid
ranges of its numeric keys, ``common.ranges``) and
``build(cfg, data_shape, num_bits, dequantizer) -> Flow`` (a model that is not a flow, the
flow-VAE, returns a ``models.core.hooks.LayerHooks``).  A family builds from
``models.builders``, ``models.core``, ``models.nets``, ``models.transforms``, ``models.vae``
and ``models.bayes`` only, never from another family.  A new family is a new module here plus one line in
``ARCHITECTURES``; the trainer, CLIs and config checks pick it up."""
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
    "discrete_flow": "models.architectures.discrete_flow",
    "vector_flow": "models.architectures.vector_flow",
    "flow_vae": "models.architectures.flow_vae",
    "bnn": "models.architectures.bnn",
}


def architecture(name: str):
    """The module of a registered architecture (raises KeyError for unknown names)."""
    return importlib.import_module(ARCHITECTURES[name])


def dequantizer_section(name: str) -> tuple[dict, dict]:
    """Defaults and choices of the ``dequantizer`` config section for family ``name``."""
    from models.builders.dequantizer import section  # late, like the families: the registry stays light

    module = architecture(name)
    return section(module.DEQUANTIZERS, getattr(module, "DEQUANTIZER_DEFAULTS", None))


def dequantizer_ranges() -> dict:
    """Valid ranges of the ``dequantizer`` section's numeric knobs (``common.ranges``)."""
    from models.builders.dequantizer import RANGES

    return RANGES


def build_model(model_cfg: dict, data_shape, num_bits: int, dequantizer: dict | None = None):
    """Build the Flow described by a resolved ``model`` config section and the resolved
    ``dequantizer`` section (None or missing keys: the family's defaults)."""
    cfg = dict(model_cfg)
    name = cfg.pop("name")
    module = architecture(name)
    defaults, _ = dequantizer_section(name)
    given = dict(dequantizer or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"unknown dequantizer key(s) {sorted(unknown)} for model {name!r}; known: {', '.join(defaults)}")
    deq = {**defaults, **given}
    if deq["kind"] not in module.DEQUANTIZERS:
        raise ValueError(f"model {name!r} supports dequantizer.kind {' | '.join(module.DEQUANTIZERS)}, "
                         f"not {deq['kind']!r}")
    return module.build(cfg, tuple(data_shape), num_bits, deq)
