"""A LeNet-5-like classifier with Bayesian layers of one ``kind`` (Louizos & Welling 2017,
arXiv:1703.01961 §5.1: 20 and 50 5x5 filters, a 500-unit dense layer):

    conv5(C -> h1) - ReLU - maxpool2 - conv5(h1 -> h2) - ReLU - maxpool2 - dense(fc) - ReLU - dense(K)

``kind``: deterministic (point estimates), mean_field (Blundell et al. 2015, arXiv:1505.05424) or
mnf (every layer an ``MNFLayer``).  Images come as the data layer hands them out (integers in
[0, 2^bits - 1]) and are scaled to [-1/2, 1/2].  ``forward(x)`` gives logits from one draw of the
weight noise per example (fresh on every call, train or eval: the predictive distribution is their
average over calls), ``kl()`` the KL term (estimate) of all layers, ``log_likelihood(x, y)``
log p(y | x, W) per example.  The trainer's hooks come from ``models.core.hooks.LayerHooks``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.bayes.deterministic import DeterministicLayer
from models.bayes.mean_field import MeanFieldLayer
from models.bayes.mnf import MNFLayer
from models.core.hooks import LayerHooks

KINDS = ("deterministic", "mean_field", "mnf")
KERNEL = 5


def _layer(kind: str, in_features: int, out_features: int, kernel_size: int | None, cfg: dict) -> nn.Module:
    if kind == "deterministic":
        return DeterministicLayer(in_features, out_features, kernel_size)
    gaussian = {"prior_var": cfg["prior_var"], "init_log_var": cfg["init_log_var"]}
    if kind == "mean_field":
        return MeanFieldLayer(in_features, out_features, kernel_size, **gaussian)
    return MNFLayer(in_features, out_features, kernel_size, **gaussian, steps=cfg["steps"],
                    reverse_steps=cfg["reverse_steps"], flow_hidden_channels=cfg["flow_hidden_channels"])


class BayesianClassifier(LayerHooks):
    def __init__(self, data_shape: tuple[int, int, int], num_bits: int, kind: str = "mnf",
                 hidden_channels=(20, 50), fc_hidden_channels: int = 500, num_classes: int = 10, steps: int = 2,
                 reverse_steps: int = 2, flow_hidden_channels: int = 50, prior_var: float = 1.0,
                 init_log_var: float = -9.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if len(data_shape) != 3:
            raise ValueError(f"the classifier takes images (C, H, W), got data of shape {tuple(data_shape)}")
        c, h, w = data_shape
        side = min(h, w)
        for _ in range(2):
            side = (side - KERNEL + 1) // 2
        if side < 1:
            raise ValueError(f"images of {h}x{w} are too small for two 5x5 convolutions and 2x2 poolings "
                             f"(at least 16x16)")
        h1, h2 = hidden_channels
        hh, ww = ((h - KERNEL + 1) // 2 - KERNEL + 1) // 2, ((w - KERNEL + 1) // 2 - KERNEL + 1) // 2
        cfg = {"prior_var": prior_var, "init_log_var": init_log_var, "steps": steps, "reverse_steps": reverse_steps,
               "flow_hidden_channels": flow_hidden_channels}
        self.kind, self.num_bits, self.num_classes = kind, num_bits, num_classes
        self.data_shape = tuple(data_shape)
        self.conv1 = _layer(kind, c, h1, KERNEL, cfg)
        self.conv2 = _layer(kind, h1, h2, KERNEL, cfg)
        self.fc1 = _layer(kind, h2 * hh * ww, fc_hidden_channels, None, cfg)
        self.fc2 = _layer(kind, fc_hidden_channels, num_classes, None, cfg)

    @property
    def bayesian_layers(self) -> dict[str, nn.Module]:
        return {"conv1": self.conv1, "conv2": self.conv2, "fc1": self.fc1, "fc2": self.fc2}

    @property
    def is_stochastic(self) -> bool:
        """Whether the predictions draw weight noise (average ``forward`` over draws to predict)."""
        return self.kind != "deterministic"

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.fc2.bias.dtype) / (2 ** self.num_bits - 1) - 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes), one draw of the weight noise per example."""
        h = F.max_pool2d(F.relu(self.conv1(self._scale(x))), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))

    def kl(self) -> torch.Tensor:
        """KL(q(W) || p(W)) of all layers in nats: exact (mean_field), a single-sample estimate of
        an upper bound (mnf), 0 (deterministic)."""
        return sum(layer.kl() for layer in self.bayesian_layers.values())

    def log_likelihood(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(y | x, W) per example, float32 (B,), one weight draw per example."""
        return -F.cross_entropy(self(x).float(), labels, reduction="none")

    @torch.no_grad()
    def layer_stats(self, x) -> dict[str, float]:
        """Each layer's KL term (``<layer>/kl``, nats)."""
        return {f"{name}/kl": float(layer.kl()) for name, layer in self.bayesian_layers.items()}
