"""A Bayesian LeNet-5-like classifier (``models.bayes.classifier``) as a family: deterministic
weights, mean-field Gaussian VI (Blundell et al. 2015, arXiv:1505.05424) or Multiplicative
Normalizing Flows (Louizos & Welling 2017, arXiv:1703.01961), ``kind``.

    -ELBO = E_q[ -sum_n log p(y_n | x_n, W) ] + KL(q(W) || p(W))      (objective.name: bnn)

It is a classifier of labelled images, not a flow over x: it takes no dequantizer.  Knobs:
``hidden_channels`` the two conv widths, ``fc_hidden_channels`` the dense layer, ``num_classes``;
MNF's ``steps`` (masked RealNVP steps of q(z)), ``reverse_steps`` (of r(z | W)) and
``flow_hidden_channels`` (their conditioners' width); ``prior_var`` of p(W) = N(0, prior_var I)
and ``init_log_var`` the initial log sigma^2 of the weights (and of q(z_0)).
"""
from __future__ import annotations

from common.ranges import at_least, between, each
from models.bayes.classifier import KINDS, BayesianClassifier

DEFAULTS = {
    "kind": "mnf",                  # deterministic | mean_field | mnf
    "hidden_channels": [20, 50],    # the two 5x5 conv layers' widths
    "fc_hidden_channels": 500,      # the dense hidden layer
    "num_classes": 10,
    "steps": 2,                     # mnf: masked RealNVP steps of q(z)
    "reverse_steps": 2,             # mnf: masked RealNVP steps of r(z | W)
    "flow_hidden_channels": 50,     # mnf: width of the couplings' conditioners
    "prior_var": 1.0,               # p(W) = N(0, prior_var I)
    "init_log_var": -9.0,           # initial log sigma^2 of q(W) (and of q(z_0))
}

RANGES = {
    "hidden_channels": each(at_least(1), length=2), "fc_hidden_channels": at_least(1), "num_classes": at_least(2),
    "steps": at_least(0), "reverse_steps": at_least(0), "flow_hidden_channels": at_least(1),
    "prior_var": between(0, 1e6, lo_open=True), "init_log_var": between(-30, 5),
}

CHOICES = {"kind": KINDS}

DEQUANTIZERS = ("none",)  # a classifier: its images are inputs, not modelled


def build(cfg: dict, data_shape: tuple[int, ...], num_bits, dequantizer: dict) -> BayesianClassifier:
    if dequantizer.get("kind", "none") != "none":
        raise ValueError(f"bnn takes no dequantizer, got dequantizer.kind {dequantizer['kind']!r}")
    return BayesianClassifier(tuple(data_shape), num_bits, **cfg)
