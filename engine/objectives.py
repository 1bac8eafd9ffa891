"""Training objectives: ``objective(model, batch) -> (loss, logs)``, and what a run of each
evaluates and draws.

The trainer calls the objective for the loss (as EDM's ``loss_fn(net, images)``): ``model``
is the (possibly DDP-wrapped) network, ``batch`` this process's micro-batch; ``loss`` is the
scalar to minimise and ``logs`` a dict of detached scalar tensors that the trainer averages
over micro-batches and ranks and records as ``train/<name>``.  Around that call the trainer
asks the objective, so that one trainer runs every kind of model:

    check(data, model)         at set-up: a one-line FlowlabError when the data kind
                               (``DATA_KINDS``: "image" | "vector" | "none") or model does not fit
    start_step(step)           before every optimizer step (annealed objectives set beta from it)
    draw_batch(model, n, g)    the batch of an objective without data (reverse_kl: base noise)
    evaluate(model, data, eval_cfg, accelerator, seed)
                               the test numbers: {"metrics": {name: value} (recorded as
                               ``test/<name>``), "line": what the log prints, "n": examples}
    save_samples(model, data, sample_cfg, stem)
                               what a sample is: an image grid ``stem.png`` or a 2-D figure
                               ``stem.png`` ({"path", "tb_image", "nonfinite", ...})
    metric                     the log shown on the progress bar and recorded first

The config's top-level ``objective`` section selects one: ``objective.name`` (default
``bpd``) is a key of :data:`OBJECTIVES`, and the other keys of the section are the class's
``DEFAULTS`` (its own knobs, checked like model keys) passed to its constructor.  A new
objective is a new class here and one registry line:

    bpd         images: mean bits/dim + auxiliary losses (the image families)
    nll         vectors: mean -log p(x) in nats + auxiliary losses (vector_flow on toy2d)
    elbo        binary images: the flow-VAE's negative ELBO with KL annealing (flow_vae)
    reverse_kl  no data: E_q[log q(x) + beta U(x)] to an energy of data/toy2d.py (vector_flow)
"""
from __future__ import annotations

import math

import torch

from common.errors import FlowlabError
from data import toy2d
from engine.metrics import bits_per_dim


def auxiliary_totals(aux: dict) -> dict:
    """Auxiliary losses summed by their own name over layers ("transforms.3.kinetic_energy"
    and "transforms.5.kinetic_energy" -> "kinetic_energy"), detached for logging."""
    out = {}
    for name, value in aux.items():
        key = name.rsplit(".", 1)[-1]
        out[key] = out.get(key, 0.0) + value.detach().float()
    return out


class Objective:
    """Base class: ``DEFAULTS`` are the config keys ``objective.<key>`` (constructor
    arguments, set as attributes) with their defaults, ``CHOICES`` their allowed values where
    restricted, ``DATA_KINDS`` the kinds of data set it trains on, ``metric`` its main log."""

    DEFAULTS: dict = {}
    CHOICES: dict = {}
    DATA_KINDS: tuple = ("image",)
    metric: str = "bpd"

    def __init__(self, **knobs):
        unknown = set(knobs) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no knob(s) {sorted(unknown)}; known: {', '.join(self.DEFAULTS)}")
        for key, value in {**self.DEFAULTS, **knobs}.items():
            setattr(self, key, value)

    @property
    def name(self) -> str:
        return next((k for k, v in OBJECTIVES.items() if v is type(self)), type(self).__name__)

    def check(self, data, model) -> None:
        """A one-line FlowlabError when this objective cannot train ``model`` on ``data``."""
        if data.kind not in self.DATA_KINDS:
            raise FlowlabError(f"objective.name={self.name} trains on {' or '.join(self.DATA_KINDS)} data, but "
                               f"data.name={data.name} gives {data.kind} data (objectives: bpd for images, nll for "
                               f"vectors, elbo for binary images, reverse_kl for data.name=none)")

    def start_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step ``step`` (0-based)."""

    def draw_batch(self, model, n: int, generator: torch.Generator) -> torch.Tensor:
        """The batch of an objective that takes no data (``DATA_KINDS == ("none",)``)."""
        raise NotImplementedError(f"objective {self.name} trains on data")

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        raise NotImplementedError

    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        raise NotImplementedError


def annealed_beta(step: int, anneal_steps: int) -> float:
    """The annealed KL / energy weight of Rezende & Mohamed 2015 (arXiv:1505.05770 §6):
    beta_t = min(1, 0.01 + t / anneal_steps), from 0.01 at step 0 to 1; 1 throughout when
    ``anneal_steps`` <= 0."""
    return 1.0 if anneal_steps <= 0 else min(1.0, 0.01 + step / anneal_steps)


def _test_split(data, eval_cfg) -> torch.Tensor:
    return data.test[: eval_cfg.max_examples] if eval_cfg.max_examples else data.test


def _scores_line(result: dict, names: dict, digits: int = 2) -> str:
    return ", ".join(f"{label} {result[n]:.{digits}f} ± {result[n + '_stderr']:.{digits}f}" for n, label in names.items())


class Annealed(Objective):
    """An objective whose weight ``beta`` follows ``annealed_beta(step, anneal_steps)``."""

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.beta = annealed_beta(0, self.anneal_steps)

    def start_step(self, step: int) -> None:
        self.beta = annealed_beta(step, self.anneal_steps)


class BitsPerDim(Objective):
    """Maximum likelihood in bits per dimension, plus the model's auxiliary losses:

        loss = mean_b [ -log p(x_b) / (D ln 2) ] + sum_l aux_l

    with ``log p(x), aux = model(x, return_aux=True)`` (every likelihood term inside
    ``log p``; ``aux`` the weighted regularisers returned by that very forward, e.g. RNODE's
    kinetic energy and Jacobian norm per CNF block) and D = C·H·W of the data batch.
    ``logs``: ``bpd`` and ``aux/<name>`` (summed by name over layers)."""

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        log_prob, aux = model(batch, return_aux=True)
        bpd = bits_per_dim(log_prob, math.prod(batch.shape[1:])).mean()
        loss = bpd
        for value in aux.values():
            loss = loss + value
        logs = {"bpd": bpd.detach(), **{f"aux/{k}": v for k, v in auxiliary_totals(aux).items()}}
        return loss, logs

    def check(self, data, model) -> None:
        super().check(data, model)
        if not hasattr(model, "log_prob"):
            raise FlowlabError(f"objective.name=bpd needs a flow, not {type(model).__name__} (a VAE: objective.name=elbo)")

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        """Test bits/dim, mean ± standard error over the split (``engine.evaluate.evaluate_bpd``)."""
        from engine.evaluate import evaluate_bpd

        r = evaluate_bpd(model, _test_split(data, eval_cfg), eval_cfg.batch_size, accelerator, seed=seed)
        return {**r, "metrics": {"bpd": r["bpd"]}, "line": f"bpd {r['bpd']:.4f} ± {r['stderr']:.4f}"}

    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        """A PNG grid, one row per temperature of ``sample.temperatures``."""
        from engine.images import save_sample_grid

        out = save_sample_grid(lambda n, t: model.sample(n, temperature=t), data.n_bits, sample_cfg.n,
                               sample_cfg.temperatures, stem + ".png")
        return {**out, "nonfinite_what": "pixels", "nonfinite_note": "shown black"}


class NegativeLogLikelihood(Objective):
    """Maximum likelihood on continuous vectors, in nats, plus the auxiliary losses:

        loss = mean_b [ -log p(x_b) ] + sum_l aux_l

    (bits/dim stays defined only for images, ``engine.metrics.bits_per_dim``).  ``logs``:
    ``nll`` and ``aux/<name>``.  Test: the mean NLL over the test split; samples (``sample.n``
    at the last of ``sample.temperatures``): for D = 2 the figure data | learned density |
    samples (``engine.figures``), else ``stem.npy``."""

    DATA_KINDS = ("vector",)
    metric = "nll"

    def check(self, data, model) -> None:
        super().check(data, model)
        if not hasattr(model, "log_prob"):
            raise FlowlabError(f"objective.name=nll needs a flow (model.name=vector_flow), not {type(model).__name__}")

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        log_prob, aux = model(batch, return_aux=True)
        nll = -log_prob.mean()
        loss = nll
        for value in aux.values():
            loss = loss + value
        return loss, {"nll": nll.detach(), **{f"aux/{k}": v for k, v in auxiliary_totals(aux).items()}}

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        from engine.evaluate import evaluate_scores

        r = evaluate_scores(lambda m, x: {"nll": -m.log_prob(x)}, model, _test_split(data, eval_cfg),
                            eval_cfg.batch_size, accelerator, seed)
        return {**r, "metrics": {"nll": r["nll"]}, "line": _scores_line(r, {"nll": "NLL"}, 4) + " nats"}

    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        temp = sample_cfg.temperatures[-1]
        samples = model.sample(sample_cfg.n, temperature=temp).float()
        bad = int((~torch.isfinite(samples)).any(dim=1).sum())
        if data.dim != 2:
            import numpy as np

            np.save(stem + ".npy", samples.cpu().numpy())
            return {"path": stem + ".npy", "tb_image": None, "nonfinite": bad, "nonfinite_what": "samples",
                    "nonfinite_note": "kept"}
        from engine.figures import figure, histogram, on_grid, to_tensor

        res = 128
        device = next(model.parameters()).device
        panels = [(f"data: {data.label}", histogram(data.test, res)),
                  ("learned density", on_grid(model.log_prob, res, device)),
                  (f"samples (T={temp:g})", histogram(samples, res))]
        img = figure(panels, stem + ".png")
        return {"path": stem + ".png", "tb_image": to_tensor(img), "nonfinite": bad, "nonfinite_what": "samples",
                "nonfinite_note": "left out"}


class NegativeELBO(Annealed):
    """The flow-VAE's negative ELBO (Rezende & Mohamed 2015, arXiv:1505.05770 §6.2), in nats,
    with the KL term annealed:

        loss = mean_b -( E_q log p(x_b | z) + beta_t E_q[log p(z) - log q_K(z | x_b)] ),
        beta_t = min(1, 0.01 + t / anneal_steps)   (``annealed_beta``; the paper's 10000)

    one posterior sample per example, with ``model(x) -> (log p(x|z), log p(z) - log q(z|x))``.
    ``logs``: ``nelbo`` (beta = 1), ``recon`` (-E log p(x|z)), ``kl`` (E[log q - log p(z)]),
    ``loss`` (what is minimised) and ``beta``.  Test: -ELBO and the importance-sampled
    -log p(x) with ``eval.iw_samples`` samples (``eval.iw_chunk`` per forward); samples: a
    grid of the decoder's Bernoulli means, one row per temperature of the prior."""

    DEFAULTS = {"anneal_steps": 10000}  # KL weight from 0.01 to 1 over the first N steps (0: 1 throughout)
    DATA_KINDS = ("image",)
    metric = "nelbo"

    def check(self, data, model) -> None:
        super().check(data, model)
        if not hasattr(model, "importance_log_px"):
            raise FlowlabError(f"objective.name=elbo needs a VAE (model.name=flow_vae), not {type(model).__name__}")

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        rec, kl_term = model(batch)
        rec, kl_term = rec.mean(0), kl_term.mean(0)  # (B,): one sample per example
        loss = -(rec + self.beta * kl_term).mean()
        logs = {"nelbo": -(rec + kl_term).mean().detach(), "recon": -rec.mean().detach(),
                "kl": -kl_term.mean().detach(), "loss": loss.detach(),
                "beta": torch.tensor(self.beta, device=loss.device)}
        return loss, logs

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        from engine.evaluate import evaluate_scores

        s = max(1, eval_cfg.iw_samples)
        chunk = max(1, min(eval_cfg.iw_chunk, s))
        batch = eval_cfg.batch_size if s == 1 else max(1, eval_cfg.batch_size // chunk)
        r = evaluate_scores(lambda m, x: {"nelbo": -m.elbo(x), "nll_is": -m.importance_log_px(x, s, chunk)}, model,
                            _test_split(data, eval_cfg), batch, accelerator, seed)
        line = _scores_line(r, {"nelbo": "-ELBO", "nll_is": f"-log p(x) (IS, S={s})"}) + " nats"
        return {**r, "iw_samples": s, "metrics": {"nelbo": r["nelbo"], "nll_is": r["nll_is"]}, "line": line}

    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        from engine.images import save_sample_grid

        out = save_sample_grid(lambda n, t: (255 * model.sample_means(n, t)).round(), 8, sample_cfg.n,
                               sample_cfg.temperatures, stem + ".png")
        return {**out, "nonfinite_what": "pixels", "nonfinite_note": "shown black"}


class ReverseKL(Annealed):
    """Fit a flow's samples to an unnormalised density exp(-U) of ``data/toy2d.py`` (reverse KL,
    Rezende & Mohamed 2015, arXiv:1505.05770 §6.1), the layers' forwards as the sampling map:

        x = T(z0),  z0 ~ N(0, I) (the batch, drawn from the base: ``draw_batch``),
        log q(x) = log N(z0) - sum_k ldj_k,
        loss = E_q[ log q(x) + beta_t U(x) ] = KL(q || p) - log Z   (at beta = 1),

    with beta_t = ``annealed_beta(t, anneal_steps)`` (the default 1500: half of the toy
    configs' 3000 steps, as the former scripts/toy2d.py annealed).  ``logs``: ``reverse_kl``
    (beta = 1), ``loss``, ``beta``.  Test: on ``eval.max_examples`` fresh samples (10000 when
    unset) E_q[log q + U] and KL(q || p) = that + log Z (``toy2d.log_partition``, a
    quadrature); samples (``sample.n`` at the last of ``sample.temperatures``): the figure
    target exp(-U) | learned density q (through the layers' inverses) | samples."""

    DEFAULTS = {"energy": "u1", "anneal_steps": 1500}
    CHOICES = {"energy": toy2d.ENERGIES}
    DATA_KINDS = ("none",)
    metric = "reverse_kl"
    EVAL_SAMPLES = 10000

    def check(self, data, model) -> None:
        super().check(data, model)
        if not hasattr(model, "push_forward"):
            raise FlowlabError(f"objective.name=reverse_kl needs a flow (model.name=vector_flow), "
                               f"not {type(model).__name__}")
        if data.dim != 2:
            raise FlowlabError(f"objective.energy={self.energy} is a density on 2-D vectors: set data.dim=2, not {data.dim}")

    def draw_batch(self, model, n: int, generator: torch.Generator) -> torch.Tensor:
        """z0 ~ N(0, I) of the model's base shape."""
        return torch.randn(n, *model.base.shape, generator=generator)

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x, log_q = model(batch, as_sampler=True)
        u = toy2d.energy(self.energy, x)
        loss = (log_q + self.beta * u).mean()
        logs = {"reverse_kl": (log_q + u).mean().detach(), "loss": loss.detach(),
                "beta": torch.tensor(self.beta, device=loss.device)}
        return loss, logs

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        from engine.evaluate import eval_seed, evaluate_scores

        n = eval_cfg.max_examples or self.EVAL_SAMPLES
        z0 = torch.randn(n, *model.base.shape, generator=torch.Generator().manual_seed(eval_seed(seed, 0)))

        def score(m, z):
            x, log_q = m.push_forward(z)
            return {"reverse_kl": log_q + toy2d.energy(self.energy, x)}

        r = evaluate_scores(score, model, z0, eval_cfg.batch_size, accelerator, seed)
        log_z = toy2d.log_partition(self.energy)
        kl = r["reverse_kl"] + log_z
        line = (f"E_q[log q + U] {r['reverse_kl']:.4f} ± {r['reverse_kl_stderr']:.4f}, "
                f"KL(q || p) {kl:.4f} (log Z = {log_z:.4f}) nats on fresh samples")
        return {**r, "kl": kl, "log_z": log_z, "metrics": {"reverse_kl": r["reverse_kl"], "kl": kl}, "line": line}

    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        from engine.figures import figure, grid, histogram, on_grid, to_tensor

        res = 128
        device = next(model.parameters()).device
        temp = sample_cfg.temperatures[-1]
        with torch.no_grad():
            samples = model.push_forward(model.base.sample(sample_cfg.n, temp))[0].float()
        bad = int((~torch.isfinite(samples)).any(dim=1).sum())
        target = torch.exp(-toy2d.energy(self.energy, grid(res))).reshape(res, res)
        panels = [(f"target exp(-U): {self.energy}", target),
                  ("learned density", on_grid(model.push_forward_log_prob, res, device)),
                  (f"samples (T={temp:g})", histogram(samples, res))]
        img = figure(panels, stem + ".png")
        return {"path": stem + ".png", "tb_image": to_tensor(img), "nonfinite": bad, "nonfinite_what": "samples",
                "nonfinite_note": "left out"}


from engine.objective_distill import DensityDistillation  # noqa: E402 (it subclasses ReverseKL above)
from engine.objective_bnn import BayesianClassification  # noqa: E402 (it subclasses Annealed, above)

OBJECTIVES = {"bpd": BitsPerDim, "nll": NegativeLogLikelihood, "elbo": NegativeELBO, "reverse_kl": ReverseKL,
              "distill": DensityDistillation, "bnn": BayesianClassification}
DEFAULT_OBJECTIVE = "bpd"


def build_objective(section: dict) -> Objective:
    """The objective of a resolved ``objective`` section (``name`` plus the class's knobs)."""
    knobs = {k: v for k, v in section.items() if k != "name"}
    return OBJECTIVES[section["name"]](**knobs)
