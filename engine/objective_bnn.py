"""The objective of Bayesian classifiers (``model.name=bnn``): the negative ELBO per example,

    loss = mean_b [ -log p(y_b | x_b, W_b) ] + beta_t * KL(q(W) || p(W)) / N,   W_b ~ q(W)

(Blundell et al. 2015, arXiv:1505.05424 §3-3.4; Louizos & Welling 2017, arXiv:1703.01961 eq. 13:
for MNF the KL is a single-sample estimate of an upper bound, so the loss is an estimate of an
upper bound on the negative ELBO).  N is the number of training examples (``objective.train_size``,
0: the train split's size), beta_t = ``annealed_beta(t, anneal_steps)`` (0: 1 throughout).
``logs``: ``nelbo`` (beta = 1), ``nll``, ``kl``, ``error`` (of the batch), ``beta``, ``loss``.

Labels: the trainer hands a labelled objective (``labelled = True``) a ``LabelledBatch`` built by
``with_labels`` from the data set's ``train_labels``; a data set without labels is a one-line error.

Test (``evaluate``): the predictive distribution p(y | x) = (1/S) sum_s softmax(f(x; W_s)),
S = ``objective.samples`` weight draws (1 for a deterministic net), and from it the test error,
the test NLL -mean log p(y | x) in nats and the expected calibration error over
``objective.ece_bins`` equal-width confidence bins (Guo et al. 2017, arXiv:1706.04599 §2):

    ECE = sum_m |B_m| / n * | acc(B_m) - conf(B_m) |

Import it through ``engine.objectives`` (which registers it as ``bnn``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import FlowlabError
from common.ranges import at_least
from engine.objectives import Annealed


@dataclass
class LabelledBatch:
    """Images (B, C, H, W) and their class labels (B,), split and moved together."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def shape(self):
        return self.images.shape

    def __len__(self) -> int:
        return self.images.shape[0]

    def split(self, size: int) -> tuple["LabelledBatch", ...]:
        return tuple(LabelledBatch(x, y) for x, y in zip(self.images.split(size), self.labels.split(size)))

    def to(self, device) -> "LabelledBatch":
        return LabelledBatch(self.images.to(device), self.labels.to(device))


def labels_of(data, split: str = "train") -> torch.Tensor:
    """``data.train_labels`` / ``data.test_labels`` as int64, or a one-line error when absent."""
    labels = getattr(data, f"{split}_labels", None)
    if labels is None:
        raise FlowlabError(f"data set {getattr(data, 'name', '?')} carries no labels ({split} split): objective.name=bnn "
                           f"trains a classifier on labelled images (an npz with y_train / y_test, cifar10, mnist, "
                           f"fashion_mnist)")
    return torch.as_tensor(labels).long()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of predictive probabilities (N, K) against labels (N,): equal-width bins of the
    confidence max_k p_k over (0, 1], each weighted by its share of the examples."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    index = torch.clamp(torch.ceil(conf.double() * bins).long() - 1, 0, bins - 1)
    ece = 0.0
    for m in range(bins):
        inside = index == m
        if inside.any():
            ece += inside.double().mean().item() * abs(correct[inside].mean().item() - conf[inside].double().mean().item())
    return ece


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H[p(y | x)] = -sum_k p_k log p_k per example, in nats."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)


@torch.no_grad()
def predictive_probs(model, images: torch.Tensor, samples: int, batch_size: int) -> torch.Tensor:
    """(1/S) sum_s softmax(model(x)) over S calls (weight draws), float64 (N, K), on the CPU;
    one call for a model without weight noise."""
    device = next(model.parameters()).device
    s = samples if getattr(model, "is_stochastic", True) else 1
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        p = sum(F.softmax(model(x).double(), dim=1) for _ in range(s)) / s
        out.append(p.cpu())
    return torch.cat(out)


def classification_scores(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Test error, NLL (nats) and ECE of predictive probabilities."""
    labels = labels.to(probs.device)
    nll = -torch.log(probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-30)).mean().item()
    error = (probs.argmax(dim=1) != labels).double().mean().item()
    return {"error": error, "nll": nll, "ece": expected_calibration_error(probs, labels, bins)}


class BayesianClassification(Annealed):
    DEFAULTS = {"anneal_steps": 0,  # KL weight from 0.01 to 1 over the first N steps (0: 1 throughout)
                "train_size": 0,    # N of the KL / N term (0: the train split's size)
                "samples": 10,      # weight draws S of the test predictive distribution
                "ece_bins": 15}     # confidence bins of the expected calibration error
    RANGES = {"anneal_steps": at_least(0), "train_size": at_least(0), "samples": at_least(1), "ece_bins": at_least(1)}
    DATA_KINDS = ("image",)
    metric = "nelbo"
    labelled = True  # the trainer passes LabelledBatch (with_labels)

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.n_train = self.train_size or None

    def check(self, data, model) -> None:
        super().check(data, model)
        if not hasattr(model, "kl") or not hasattr(model, "log_likelihood"):
            raise FlowlabError(f"objective.name=bnn trains a Bayesian classifier (model.name=bnn), not "
                               f"{type(model).__name__}")
        train, test = labels_of(data, "train"), labels_of(data, "test")
        classes = int(max(train.max(), test.max())) + 1 if train.numel() else 0
        if classes > model.num_classes:
            raise FlowlabError(f"data set {data.name} has labels up to {classes - 1}, but model.num_classes="
                               f"{model.num_classes}: set model.num_classes={classes}")
        self.n_train = self.train_size or data.train.shape[0]

    def with_labels(self, images: torch.Tensor, data, indices: torch.Tensor) -> LabelledBatch:
        """The batch ``images`` = data.train[indices] (augmented, on its device) with its labels."""
        return LabelledBatch(images, labels_of(data, "train")[indices].to(images.device))

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        if not isinstance(batch, LabelledBatch):
            raise FlowlabError("objective.name=bnn needs labelled batches (images with their class labels)")
        logits = model(batch.images).float()
        nll = F.cross_entropy(logits, batch.labels)
        kl = getattr(model, "module", model).kl().float()
        n = self.n_train or len(batch)
        loss = nll + self.beta * kl / n
        error = (logits.argmax(dim=1) != batch.labels).float().mean()
        logs = {"nelbo": (nll + kl / n).detach(), "nll": nll.detach(), "kl": kl.detach(), "error": error.detach(),
                "loss": loss.detach(), "beta": torch.tensor(self.beta, device=loss.device)}
        return loss, logs

    def evaluate(self, model, data, eval_cfg, accelerator=None, seed: int = 0) -> dict:
        from engine.evaluate import eval_seed, seeded

        labels = labels_of(data, "test")
        n = eval_cfg.max_examples or data.test.shape[0]
        images, labels = data.test[:n], labels[:n]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with seeded(eval_seed(seed, 0), device):
            probs = predictive_probs(model, images, self.samples, eval_cfg.batch_size)
        model.train(was_training)
        r = classification_scores(probs, labels, self.ece_bins)
        s = self.samples if getattr(model, "is_stochastic", True) else 1
        line = f"error {100 * r['error']:.2f}%, NLL {r['nll']:.4f} nats, ECE {100 * r['ece']:.2f}% (S={s})"
        return {**r, "n": int(images.shape[0]), "samples": s, "metrics": dict(r), "line": line}

    def save_samples(self, model, data, sample_cfg, stem: str) -> dict:
        """``stem.json``: the predictive probabilities and entropies of the first ``sample.n`` test
        images (a classifier draws no images)."""
        images = data.test[: sample_cfg.n]
        probs = predictive_probs(model, images, self.samples, 256)
        bad = int((~torch.isfinite(probs)).any(dim=1).sum())
        rows = [{"probs": [round(v, 6) for v in p.tolist()], "entropy": round(float(h), 6)}
                for p, h in zip(probs, predictive_entropy(probs))]
        with open(stem + ".json", "w") as f:
            json.dump({"max_entropy": math.log(probs.shape[1]), "examples": rows}, f)
        return {"path": stem + ".json", "tb_image": None, "nonfinite": bad, "nonfinite_what": "predictions",
                "nonfinite_note": "kept"}
