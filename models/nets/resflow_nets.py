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
"""
from __future__ import annotations

from torch import nn

from models.nets.lipschitz import SpectralNormConv2d, SpectralNormLinear
from models.nets.lipswish import LipSwish

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


class ConvResidualNet(nn.Sequential):
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

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1)).reshape(x.shape)
