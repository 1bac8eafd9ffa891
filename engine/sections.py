"""Typed, read-only views of a resolved config: ``cfg.train.batch_size``, not ``cfg["train"]["batch_size"]``.

``engine.config.resolve`` stays the one place that fills defaults and checks keys, types
and choices; its plain dict is what run directories and checkpoints store.
``RunConfig.from_resolved(d)`` turns it, once, into frozen dataclasses; ``to_dict()``
gives the dict back (``RunConfig.from_resolved(d).to_dict() == d``).

The section classes are generated from ``engine.config.DEFAULTS``: one field per key,
same name, same default, in the same order, so the defaults have a single source and a
key added there is a field here.  Lists become tuples (the views are immutable).
``model`` and ``objective`` are plain dicts (their keys depend on the architecture /
objective); any other top-level section (one added to ``resolve`` later) passes through
unchanged in ``extra`` and reads as an attribute too (``cfg.extra["x"]`` is ``cfg.x``).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Optional

from engine.config import DEFAULTS, OPTIONAL_TYPES
from common.errors import FlowlabError
from engine.objectives import DEFAULT_OBJECTIVE


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _annotation(section: str, key: str, default) -> Any:
    example = OPTIONAL_TYPES.get((section, key), default)
    kind = tuple if isinstance(example, (list, tuple)) else type(example)
    return Optional[kind] if default is None else kind


def _section_to_dict(self) -> dict:
    """The section as the resolved config stores it (tuples back to lists)."""
    return {f.name: _thaw(copy.deepcopy(getattr(self, f.name))) for f in dataclasses.fields(self)}


@classmethod
def _section_from_dict(cls, values: dict):
    """The view of a resolved section (keys as ``engine.config.DEFAULTS``; missing ones default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise FlowlabError(f"config section '{cls.SECTION}' has unknown key(s) {unknown}; known: {', '.join(sorted(names))}")
    return cls(**{k: _freeze(copy.deepcopy(v)) for k, v in values.items()})


def section_class(class_name: str, section: str) -> type:
    """A frozen dataclass with one field per key of ``DEFAULTS[section]`` (its default as the field's)."""
    fields = [(key, _annotation(section, key, default), dataclasses.field(default=_freeze(default)))
              for key, default in DEFAULTS[section].items()]
    namespace = {"SECTION": section, "to_dict": _section_to_dict, "from_dict": _section_from_dict,
                 "__doc__": f"The ``{section}`` section of a resolved config (fields and defaults: "
                            f"``engine.config.DEFAULTS['{section}']``)."}
    cls = dataclasses.make_dataclass(class_name, fields, frozen=True, namespace=namespace)
    cls.__module__ = __name__  # importable by name (pickling)
    return cls


DataConfig = section_class("DataConfig", "data")
TrainConfig = section_class("TrainConfig", "train")
EvalConfig = section_class("EvalConfig", "eval")
SampleConfig = section_class("SampleConfig", "sample")
PaperConfig = section_class("PaperConfig", "paper")

TYPED_SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "sample": SampleConfig,
                  "paper": PaperConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A resolved config, typed: ``model`` / ``objective`` dicts, one view per section, ``extra``
    for any other top-level section (as plain data)."""

    model: dict
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    paper: PaperConfig = dataclasses.field(default_factory=PaperConfig)
    objective: dict = dataclasses.field(default_factory=lambda: {"name": DEFAULT_OBJECTIVE})
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_resolved(cls, d: dict) -> "RunConfig":
        """The typed view of ``engine.config.resolve``'s output (not re-checked here)."""
        if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
            raise FlowlabError("a resolved config needs a 'model' section")
        typed = {name: view.from_dict(d.get(name) or {}) for name, view in TYPED_SECTIONS.items()}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in TYPED_SECTIONS and k not in ("model", "objective")}
        objective = copy.deepcopy(d.get("objective") or {"name": DEFAULT_OBJECTIVE})
        return cls(model=copy.deepcopy(d["model"]), objective=objective, extra=extra, **typed)

    @classmethod
    def of(cls, cfg) -> "RunConfig":
        """``cfg`` itself if it is a RunConfig, else the view of the resolved dict ``cfg``."""
        return cfg if isinstance(cfg, RunConfig) else cls.from_resolved(cfg)

    def to_dict(self) -> dict:
        """The resolved config as a plain dict (what ``config.yaml`` and checkpoints hold)."""
        out = {"model": copy.deepcopy(self.model)}
        out.update({name: getattr(self, name).to_dict() for name in TYPED_SECTIONS})
        out["objective"] = copy.deepcopy(self.objective)
        out.update(copy.deepcopy(self.extra))
        return out

    @property
    def raw(self) -> dict:
        """The resolved dict (``to_dict()``)."""
        return self.to_dict()

    def __getattr__(self, name: str):
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no section {name!r}")

    def run_difference(self, other: "RunConfig") -> str | None:
        """The first section that makes ``other`` another run than this one, or None: model,
        data (``data.path`` compared as files), objective and the ``extra`` sections; train,
        eval, sample and paper may change when a run is resumed."""
        def data(c):
            path = c.data.path
            return dataclasses.replace(c.data, path=os.path.realpath(path) if isinstance(path, str) else path)
        pairs = [("model", self.model, other.model), ("data", data(self), data(other)),
                 ("objective", self.objective, other.objective)]
        pairs += [(k, self.extra.get(k), other.extra.get(k)) for k in {**self.extra, **other.extra}]
        for name, mine, theirs in pairs:
            if mine != theirs:
                return name
        return None
