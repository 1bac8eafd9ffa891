"""The trainer's model hooks, for any model whose layers are ``Transform``\\ s among its modules.

The trainer calls these on every model unconditionally.  ``Flow`` (``models.core.flow``)
inherits them, and so does a model that is not a flow (the flow-VAE, ``models.vae``, whose
posterior is a chain of transforms).  Each hook gathers the layers' own hooks
(``models.core.transform``) over every ``Transform`` among the modules, nested ones
included, with names prefixed by the layer's path:

    data_init(x)             every layer's ``data_init()`` (``Flow`` adds its data-dependent forward)
    after_optimizer_step()   every layer's ``after_optimizer_step()`` (by class: ``after_optimizer_step_all``)
    diagnostics()            {"<layer path>.<name>": float}
    diagnostics_summary()    the same, summed and maximised over layers: "<name>/sum", "<name>/max"
    layer_stats(x)           per-layer statistics of the batch ``x``: none here; a model says what its are
    find_nonfinite(x)        the first non-finite parameter (a model also runs ``x`` through its layers)
"""
from __future__ import annotations

import torch
from torch import nn

from models.core.compose import Compose
from models.core.transform import Transform


class LayerHooks(nn.Module):
    """Base class of trainable models: the trainer's hooks over the model's ``Transform`` layers."""

    def layers(self):
        """(name, Transform) of every transform among the modules, nested ones included."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, Transform) and not isinstance(m, Compose)]

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Every layer's ``data_init()`` (no data-dependent forward here)."""
        for _, t in self.layers():
            t.data_init()

    def after_optimizer_step(self) -> None:
        """Every layer's hook, through its class's ``after_optimizer_step_all``: one call per
        class with its layers in module order, classes in the order they first appear."""
        by_class: dict[type, list[Transform]] = {}
        for _, t in self.layers():
            by_class.setdefault(type(t), []).append(t)
        for cls, layers in by_class.items():
            cls.after_optimizer_step_all(layers)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        out = {}
        for name, t in self.layers():
            out.update({f"{name}.{k}": float(v) for k, v in t.diagnostics().items()})
        return out

    @torch.no_grad()
    def diagnostics_summary(self) -> dict[str, float]:
        """Each layer-level diagnostic over all layers reporting it: ``<name>/sum`` and
        ``<name>/max`` (e.g. ``nfe_forward/sum``: the evaluations of all CNFs of a step)."""
        grouped: dict[str, list[float]] = {}
        for _, t in self.layers():
            for k, v in t.diagnostics().items():
                grouped.setdefault(k, []).append(float(v))
        out = {}
        for k, values in grouped.items():
            out[f"{k}/sum"], out[f"{k}/max"] = sum(values), max(values)
        return out

    @torch.no_grad()
    def layer_stats(self, x: torch.Tensor) -> dict[str, float]:
        """Per-layer statistics of the batch ``x`` (none by default)."""
        return {}

    @torch.no_grad()
    def find_nonfinite(self, x: torch.Tensor) -> str | None:
        """Name of the first non-finite parameter, or None."""
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                return f"{name}: non-finite parameter"
        return None
