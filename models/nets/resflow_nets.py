"""The residual branches g of Residual Flows / i-ResNet blocks (Chen et al. 2019 §5,
Behrmann et al. 2019 §5), built only from Lipschitz-constrained layers
(``models.nets.lipschitz``) and 1-Lipschitz activations, so Lip(g) <= coeff^L < 1.

ConvResidualNet (kernels '3-1-3', the official CIFAR-10 block, pre-activation):
    [act] -> SNConv kxk C->h -> act -> SNConv 1x1 h->h -> act -> SNConv kxk h->C
    (the leading activation is dropped for the very first block of the model)
    ``norms`` (e.g. (2, 2, 2, 2), the default): the p of each layer's domain / codomain, for
    induced mixed norms; the first and last must agree.
FCResidualNet (the fully connected blocks at the end of the last scale):
    [act] -> flatten -> SNLinear D->h -> act -> SNLinear h->h -> act -> SNLinear h->D -> reshape

With LipSwish, f(y) = silu(b y) / (1.1 b), both nets fold every activation's slope into
the layers around it (``lipswish_chain``):

    b (W x + c) = (b W) x + b c                 b multiplies the layer before it,
    W' f(y) = (W' / (1.1 b)) silu(b y) + c'     1 / (1.1 b) the layer after it,

so g is the same function with one plain silu per activation.  No pass over an
activation computes b y or divides by 1.1, in the forward or in any backward (the
power series evaluates g and its vector-Jacobian products several times per block, and
differentiates one of them again); rescaling a weight costs a pass over the weight only.
The silu (``models.nets.silu``) keeps its input alone for the backward, as LipSwish's own
Function does, and differentiates its derivative in closed form (eight passes over
the activation for the first and second derivative, where autograd's silu makes eighteen).  A leading activation (pre-activation)
has no layer before it: b x is one product on the block's input (few channels).  The
parameters (each LipSwish's beta, each layer's weight and bias) and the state_dict are
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.lipschitz import SpectralNormConv2d, SpectralNormLinear
from models.nets.lipswish import LipSwish
from models.nets.silu import silu

ACTIVATIONS = {
    "lipswish": LipSwish,
    "elu": nn.ELU,
    "relu": nn.ReLU,
}


def _norms(norms, n_layers: int) -> tuple[float, ...]:
    """Per-boundary norm orders (input, between layers, output): 2 everywhere by default."""
    if norms is None:
        return (2.0,) * (n_layers + 1)
    norms = tuple(float(r) for r in norms)
    if len(norms) != n_layers + 1:
        raise ValueError(f"{n_layers} layers need {n_layers + 1} norm orders, got {norms}")
    if norms[0] != norms[-1]:
        raise ValueError(f"the block's input and output norms must agree (a contraction in one norm), got {norms}")
    return norms


def _act(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def lipswish_chain(layers, x: torch.Tensor) -> torch.Tensor:
    """``[LipSwish] layer (LipSwish layer)*`` applied to x with the slopes folded into the
    layers (module docstring); each layer offers ``normalized_weight``, ``bias`` and
    ``affine(x, weight, bias)`` (``models.nets.lipschitz``)."""
    grad = torch.is_grad_enabled()  # without autograd (sampling): silu in place on the fresh layer output

    def act(t):
        return silu(t) if grad else F.silu(t, inplace=True)

    scale = None  # the factor the next layer's weight takes: 1 / (1.1 b) of the activation before it
    start = 0
    if isinstance(layers[0], LipSwish):
        b = layers[0].slope(x.dtype)
        x, scale, start = act(x * b), 1.0 / (1.1 * b), 1
    for i in range(start, len(layers), 2):
        layer, lipswish = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        weight, bias = layer.normalized_weight().to(x.dtype), layer.bias.to(x.dtype)
        if lipswish is not None:
            b = lipswish.slope(x.dtype)
            scale, bias = (b if scale is None else scale * b), bias * b
        x = layer.affine(x, weight if scale is None else weight * scale, bias)
        scale = None
        if lipswish is not None:
            x, scale = act(x), 1.0 / (1.1 * b)
    return x


class ConvResidualNet(nn.Sequential):
    channels_last_net = True  # train.memory_format=channels_last runs it NHWC (models.core.memory_format)

    def __init__(self, in_shape: tuple[int, int, int], hidden: int, kernels=(3, 1, 3), activation: str = "lipswish",
                 preact: bool = True, norms=None, **sn):
        norms = _norms(norms, len(kernels))
        c = in_shape[0]
        h_w = tuple(in_shape[1:])
        layers: list[nn.Module] = [_act(activation)] if preact else []
        chans = [c] + [hidden] * (len(kernels) - 1) + [c]
        for i, k in enumerate(kernels):
            layers.append(SpectralNormConv2d(chans[i], chans[i + 1], k, (chans[i], *h_w), domain=norms[i],
                                             codomain=norms[i + 1], **sn))
            if i < len(kernels) - 1:
                layers.append(_act(activation))
        super().__init__(*layers)
        self.fold_lipswish = activation == "lipswish"

    def forward(self, x):
        return lipswish_chain(list(self), x) if self.fold_lipswish else super().forward(x)


class FCResidualNet(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], hidden: int, n_layers: int = 3, activation: str = "lipswish",
                 preact: bool = True, norms=None, **sn):
        super().__init__()
        norms = _norms(norms, n_layers)
        self.in_shape = tuple(in_shape)
        d = in_shape[0] * in_shape[1] * in_shape[2]
        layers: list[nn.Module] = [_act(activation)] if preact else []
        dims = [d] + [hidden] * (n_layers - 1) + [d]
        for i in range(n_layers):
            layers.append(SpectralNormLinear(dims[i], dims[i + 1], domain=norms[i], codomain=norms[i + 1], **sn))
            if i < n_layers - 1:
                layers.append(_act(activation))
        self.net = nn.Sequential(*layers)
        self.fold_lipswish = activation == "lipswish"

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        h = lipswish_chain(list(self.net), h) if self.fold_lipswish else self.net(h)
        return h.reshape(x.shape)
