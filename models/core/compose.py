"""Composite transforms: a chain of transforms, and the inverse of one.

Compose([t_1, ..., t_K]):  z = t_K(...t_1(x)),   ldj = sum_k ldj_k
    (the change of variables applied K times; for surjections the sum of their
    likelihood terms, SurVAE Flows, arXiv:2007.02731 §2)
    inverse: x = t_1^-1(...t_K^-1(z)); auxiliary losses of the children are gathered
    under their index ("3.kinetic_energy"); a chain factors out when any child does,
    and ``split``/``merge`` then keep the latent of every factor-out child in order.

Inverse(t):  forward = t.inverse,  ldj = log|det dt^-1/dz| = -ldj_t(t^-1(z))
    (nflows' ``InverseTransform``): e.g. a checkerboard merge is the inverse of the
    split, a sigmoid the inverse of a logit.

Children are registered under their index ("0", "1", ...), exactly as in an
``nn.ModuleList``, so a chain's parameters keep the names a list of layers had.
"""
from __future__ import annotations

import torch

from models.core.transform import Transform


class Compose(Transform):
    def __init__(self, transforms):
        super().__init__()
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"Compose takes Transforms, got {type(t).__name__} at position {i}")
            self.add_module(str(i), t)
        self.factors_out = any(t.factors_out for t in self)
        self.bijective = all(t.bijective for t in self)

    # --- a sequence of layers ------------------------------------------------------------
    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Transform:
        return list(self._modules.values())[i]

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        for t in self:
            shape = tuple(t.output_shape(shape))
        return shape

    def input_shape(self, out_shape):
        shape = tuple(out_shape)
        for t in reversed(list(self)):
            shape = tuple(t.input_shape(shape))
        return shape

    # --- the change of variables ---------------------------------------------------------
    def forward_aux(self, x, context=None):
        z, total, aux = x, None, {}
        for i, t in enumerate(self):
            z, ldj, part = t.forward_aux(z, context)
            total = ldj if total is None else total + ldj
            aux.update({f"{i}.{k}": v for k, v in part.items()})
        if total is None:
            total = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return z, total, aux

    def forward(self, x, context=None):
        z, ldj, _ = self.forward_aux(x, context)
        return z, ldj

    def inverse(self, z, context=None, *, temperature=1.0):
        for t in reversed(list(self)):
            z = t.inverse(z, context, temperature=temperature)
        return z

    def inverse_with_ldj(self, z, context=None):
        total = None
        for t in reversed(list(self)):
            z, ldj = t.inverse_with_ldj(z, context)
            total = ldj if total is None else total + ldj
        return z, total

    # --- exact latents -----------------------------------------------------------------
    def split(self, x, context=None, on_split=None):
        """``(z, ldj, latents)``: ``latents`` holds one entry per factor-out child, in order.
        ``on_split(layer, kept, latent)`` is called at each one (the codec scores latents there)."""
        z, total, latents = x, None, []
        for t in self:
            if isinstance(t, Compose):
                z, ldj, inner = t.split(z, context, on_split)
                latents += inner
            elif t.factors_out:
                z, ldj, latent = t.split(z, context)
                latents.append(latent)
                if on_split is not None:
                    on_split(t, z, latent)
            else:
                z, ldj = t(z, context)
            total = ldj if total is None else total + ldj
        return z, total, latents

    def merge(self, z, latents, context=None):
        """Inverse of ``split``: ``latents`` a list (consumed from the end), or a callable
        ``latents(layer, kept) -> latent`` asked at each factor-out layer (entropy decoding)."""
        if not callable(latents):
            latents = list(latents)
        for t in reversed(list(self)):
            if isinstance(t, Compose):
                z = t.merge(z, latents, context)
            elif t.factors_out:
                latent = latents(t, z) if callable(latents) else latents.pop()
                z = t.merge(z, latent, context)
            else:
                z = t.inverse(z, context)
        return z

    def factor_out_layers(self) -> list[Transform]:
        """The factor-out layers in forward order (nested chains included)."""
        out = []
        for t in self:
            out += t.factor_out_layers() if isinstance(t, Compose) else ([t] if t.factors_out else [])
        return out


class Inverse(Transform):
    """The inverse of a bijection, as a transform."""

    def __init__(self, transform: Transform):
        super().__init__()
        if not transform.bijective:
            raise ValueError(f"Inverse needs a bijection, {type(transform).__name__} is not one")
        self.transform = transform
        self.exact_ldj, self.exact_inverse = transform.exact_ldj, transform.exact_inverse
        self.invertible_backprop = transform.invertible_backprop  # its forward is the closed-form inverse
        self.discrete = transform.discrete

    def forward(self, x, context=None):
        return self.transform.inverse_with_ldj(x, context)

    def inverse(self, z, context=None, *, temperature=1.0):
        return self.transform(z, context)[0]

    def inverse_with_ldj(self, z, context=None):
        return self.transform(z, context)

    def output_shape(self, in_shape):
        return self.transform.input_shape(in_shape)

    def input_shape(self, out_shape):
        return self.transform.output_shape(out_shape)

    def extra_repr(self) -> str:
        return f"of {type(self.transform).__name__}"
