"""Bayesian neural networks: weight posteriors over dense and convolutional layers.

    deterministic.py   point-estimate weights (the baseline; KL = 0)
    mean_field.py      q(W) = prod N(mu, sigma^2), local reparameterization
                       (Blundell et al. 2015, arXiv:1505.05424; Kingma et al. 2015, arXiv:1506.02557)
    noise_flow.py      q(z) over multiplicative noise: diagonal Gaussian + masked RealNVP steps, and the
                       auxiliary reverse model r(z | W) of the MNF bound
    mnf.py             Multiplicative Normalizing Flows: q(W) = int q(W | z) q(z) dz
                       (Louizos & Welling 2017, arXiv:1703.01961)
    classifier.py      the LeNet-5-like classifier built from any of the three (``kind``)

Every layer has ``forward(x)`` (one draw of the noise per example) and ``kl()`` (the KL term, or
an unbiased single-sample estimate of an upper bound on it, in nats).
"""
