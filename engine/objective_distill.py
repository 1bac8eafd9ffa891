"""Probability-density distillation: an IAF student fitted to a frozen MAF teacher by the
reverse KL on the student's own samples (van den Oord et al. 2018, Parallel WaveNet,
arXiv:1711.10433 §3; the MAF / IAF asymmetry of Papamakarios et al. 2017, arXiv:1705.07057
§3.3, and Kingma et al. 2016, arXiv:1606.04934).

    z0 ~ N(0, I) (the batch: ``draw_batch``),  x = S^-1(z0)  (the student's sampler, one
        MADE pass per IAF layer: ``Flow.sample_with_log_prob``),
    log q_S(x) = log N(z0) - sum_k log|det dx/dz|_k,
    loss = E_q[ log q_S(x) - beta_t log p_T(x) ] = KL(q_S || p_T)   (at beta = 1),

reparameterized: the gradient runs through the sample x and through log q_S; the teacher's
parameters are frozen (``requires_grad`` False, eval mode) but its log-density is
differentiated with respect to x.  The teacher is a run of ``train.py`` (``objective.teacher``:
its run directory or model file, read by ``engine.run.load_run``: safetensors / weights-only
checkpoints, no pickle), a ``vector_flow`` trained by maximum likelihood (``objective.name=nll``),
whose density is one pass per MAF layer.  This is ``ReverseKL`` with the energy replaced by
-log p_T and the push-forward by the model's own sampler; ``beta`` anneals as there
(``anneal_steps``, default 0: beta = 1 throughout).

Test (``evaluate``): KL(q_S || p_T) on ``eval.max_examples`` fresh student samples (10000 when
unset), mean ± standard error; and on the teacher's test split (its config's ``data``
section, the first ``eval.max_examples``) the test NLL of the student (IAF density of given
data: D sequential passes per layer) and of the teacher.  Samples: teacher density | student
density | student samples (2-D), else ``stem.npy``.
"""
from __future__ import annotations

import torch

from common.errors import FlowlabError
from common.ranges import ANY, at_least
from engine.objectives import NegativeLogLikelihood, Objective, ReverseKL, _scores_line


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (a fixed target)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(path: str, use_ema: bool = True):
    """(frozen teacher flow, its test split) of the run or model file ``path``; anything but a
    ``vector_flow`` trained with ``objective.name=nll`` is a one-line FlowlabError."""
    from engine.run import load_run
    from engine.setup import load_data

    hint = ("a MAF trained by maximum likelihood, e.g. python train.py "
            "experiments/distill_teacher_two_moons.yaml --out runs/distill_teacher_two_moons")
    if not isinstance(path, str) or not path:
        raise FlowlabError(f"objective.teacher is not set: give the run directory of the teacher ({hint})")
    try:
        cfg, model, _ = load_run(path, use_ema=use_ema)
    except FlowlabError as e:
        raise FlowlabError(f"objective.teacher={path}: {e} (the teacher is {hint})") from None
    if cfg.model["name"] != "vector_flow" or cfg.objective["name"] != "nll":
        raise FlowlabError(f"objective.teacher={path} is a {cfg.model['name']} run of objective "
                           f"{cfg.objective['name']}; the teacher must be a vector_flow trained with objective.name=nll "
                           f"({hint})")
    return freeze(model), load_data(cfg).test


class DensityDistillation(ReverseKL):
    """KL(q_S || p_T) of a student flow to a frozen teacher on the student's own samples (see
    the module docstring).  ``teacher`` is a path (the config key) or, in code, a built flow;
    ``teacher_test`` then optionally gives the test split for the NLL columns."""

    DEFAULTS = {
        "teacher": "",          # run directory (or model.safetensors) of the MAF teacher, relative to the cwd
        "teacher_ema": True,    # load the teacher's EMA weights when its run kept an EMA
        "anneal_steps": 0,      # weight of log p_T from 0.01 to 1 over the first N steps (0: 1 throughout)
    }
    CHOICES: dict = {}
    RANGES = {"teacher": ANY, "teacher_ema": ANY, "anneal_steps": at_least(0)}
    metric = "kl"

    def __init__(self, teacher_test: torch.Tensor | None = None, **knobs):
        super().__init__(**knobs)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher_model, self.teacher_test = freeze(self.teacher), teacher_test
        else:
            self.teacher_model, self.teacher_test = load_teacher(self.teacher, self.teacher_ema)
        self.dim = int(self.teacher_model.num_dims)

    def _teacher_on(self, device) -> torch.nn.Module:
        return self.teacher_model.to(device)

    def check(self, data, model) -> None:
        Objective.check(self, data, model)
        if not hasattr(model, "sample_with_log_prob"):
            raise FlowlabError(f"objective.name=distill trains a flow (model.name=vector_flow, model.flow=iaf), "
                               f"not {type(model).__name__}")
        if data.dim != self.dim:
            raise FlowlabError(f"objective.teacher models {self.dim}-D vectors: set data.dim={self.dim}, not {data.dim}")
        slow = sorted({type(t).__name__ for _, t in model.layers() if not t.exact_inverse})
        if slow:
            raise FlowlabError(f"the student samples through its layers' inverses with gradients, and {', '.join(slow)} "
                               f"has no closed-form inverse: use model.flow=iaf (or maf, realnvp, nice)")

    def kl_terms(self, model, z0: torch.Tensor):
        """(x, log q_S(x), log p_T(x)) for base noise ``z0``, with gradients to the student."""
        x, log_q = model(z0, as_sampler="inverse")
        return x, log_q, self._teacher_on(x.device).log_prob(x)

    def __call__(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        _, log_q, log_p = self.kl_terms(model, batch)
        loss = (log_q - self.beta * log_p).mean()
        logs = {"kl": (log_q - log_p).mean().detach(), "loss": loss.detach(),
                "beta": torch.tensor(self.beta, device=loss.device)}
        return loss, logs

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        from engine.evaluate import eval_seed, evaluate_scores

        n = eval_cfg.max_examples or self.EVAL_SAMPLES
        z0 = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(eval_seed(seed, 0)))

        @torch.no_grad()
        def kl_score(m, z):
            _, log_q, log_p = self.kl_terms(m, z)
            return {"kl": log_q - log_p}

        r = evaluate_scores(kl_score, model, z0, eval_cfg.batch_size, accelerator, seed)
        metrics, line = {"kl": r["kl"]}, f"KL(q_S || p_T) {r['kl']:.4f} ± {r['kl_stderr']:.4f} nats on {n} fresh samples"
        if self.teacher_test is not None:
            test = self.teacher_test[: eval_cfg.max_examples] if eval_cfg.max_examples else self.teacher_test

            @torch.no_grad()
            def nll_score(m, x):
                return {"nll": -m.log_prob(x), "teacher_nll": -self._teacher_on(x.device).log_prob(x)}

            t = evaluate_scores(nll_score, model, test, eval_cfg.batch_size, accelerator, seed)
            r.update({k: v for k, v in t.items() if k not in ("n", "nonfinite")})
            r["nonfinite"] = max(r["nonfinite"], t["nonfinite"])
            metrics.update(nll=t["nll"], teacher_nll=t["teacher_nll"])
            line += (f"; test NLL ({t['n']}): " + _scores_line(t, {"nll": "student", "teacher_nll": "teacher"}, 4)
                     + " nats")
        return {**r, "metrics": metrics, "line": line}

    @torch.no_grad()
    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        if self.dim != 2:  # samples as stem.npy, as the nll objective keeps them
            return NegativeLogLikelihood.save_samples(self, model, data, sample_cfg, stem)
        from engine.figures import figure, histogram, on_grid, to_tensor

        temp = sample_cfg.temperatures[-1]
        samples = model.sample(sample_cfg.n, temperature=temp).float()
        res, device = 128, next(model.parameters()).device
        panels = [("teacher density", on_grid(self._teacher_on(device).log_prob, res, device)),
                  ("student density", on_grid(model.log_prob, res, device)),
                  (f"student samples (T={temp:g})", histogram(samples, res))]
        img = figure(panels, stem + ".png")
        return {"path": stem + ".png", "tb_image": to_tensor(img),
                "nonfinite": int((~torch.isfinite(samples)).any(dim=1).sum()), "nonfinite_what": "samples",
                "nonfinite_note": "left out"}
