"""The MNF table (issue 16, item 2): a deterministic LeNet, mean-field Gaussian VI and MNF trained for
the same number of epochs on labelled images, then

  (a) test error, test NLL (S weight draws) and expected calibration error (15 bins);
  (b) the predictive entropy (nats; its maximum is log 10 = 2.303) on in-distribution test images and on
      out-of-distribution inputs: uniform-noise images, test images rotated by 90 degrees, upside down.

Each model trains on the shared trainer (``engine.trainer.Trainer``) from its config; the labels come
from the data set (``train_labels`` / ``test_labels``) or, where the loader does not carry them yet,
from the npz file's ``y_train`` / ``y_test``.  Prints both tables as markdown (and writes them to
``--out``/table.md).

    python scripts/mnf_table.py [--epochs 10] [--out runs/mnf_table] [--samples 10] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from common.errors import FlowlabError
from engine.config import load_config
from engine.objectives import OBJECTIVES  # noqa: F401 (registers bnn before objective_bnn is read)
from engine.objective_bnn import classification_scores, predictive_entropy, predictive_probs
from engine.setup import load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"deterministic": "mnf_small_deterministic.yaml", "mean-field": "mnf_small_mean_field.yaml",
           "MNF": "mnf_small.yaml"}


def with_labels(data, path: str | None):
    """``data`` with ``train_labels`` / ``test_labels``: its own, else the npz file's y_train / y_test."""
    if getattr(data, "train_labels", None) is not None and getattr(data, "test_labels", None) is not None:
        return data
    if not path or not path.endswith(".npz"):
        raise FlowlabError(f"data set {data.name} carries no labels and is not an npz file with y_train / y_test")
    with np.load(path, allow_pickle=False) as f:
        data.train_labels = torch.from_numpy(f["y_train"][: data.train.shape[0]]).long()
        data.test_labels = torch.from_numpy(f["y_test"][: data.test.shape[0]]).long()
    return data


def ood_sets(test: torch.Tensor, n_bits: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    high = 2 ** n_bits
    return {"test (in-distribution)": test,
            "uniform noise": torch.randint(0, high, test.shape, dtype=torch.uint8, generator=generator),
            "rotated 90°": torch.rot90(test, 1, dims=(2, 3)),
            "upside down": test.flip(2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/mnf_table")
    p.add_argument("--samples", type=int, default=10, help="weight draws S of the predictive distribution")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--ood-examples", type=int, default=500, help="test images behind each entropy of table (b)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every model")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.samples < 1:
        raise FlowlabError("--epochs and --samples must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    from engine.trainer import Trainer

    rows, entropies, data = [], {}, None
    for label, config in CONFIGS.items():
        cfg = load_config(os.path.join(ROOT, "experiments", config), [f"objective.samples={a.samples}", *a.overrides])
        if data is None:
            data = with_labels(load_data(cfg), cfg["data"]["path"])
        steps_per_epoch = math.ceil(data.train.shape[0] / cfg["train"]["batch_size"])
        steps = a.epochs * steps_per_epoch
        cfg["train"].update(steps=steps, eval_every=0, sample_every=0, checkpoint_every=steps, log_every=steps_per_epoch)
        run_dir = os.path.join(a.out, label.lower())
        os.makedirs(run_dir, exist_ok=True)
        start = time.perf_counter()
        trainer = Trainer(cfg, run_dir, data=data, tensorboard=False)
        trainer.fit()
        minutes = (time.perf_counter() - start) / 60
        model, objective = trainer.model, trainer.objective
        result = objective.evaluate(model, data, trainer.cfg.eval, seed=cfg["train"]["seed"])
        rows.append((label, result, minutes, sum(p.numel() for p in model.parameters())))
        model.eval()
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(1)
        entropies[label] = {name: predictive_entropy(predictive_probs(model, x, a.samples, 500)).mean().item()
                            for name, x in ood_sets(data.test[: a.ood_examples], data.n_bits, g).items()}
        if label == "deterministic":
            assert classification_scores(predictive_probs(model, data.test, 1, 500), data.test_labels)["error"] == \
                result["error"]
    lines = [f"data: {data.source}; {a.epochs} epochs each, batch {cfg['train']['batch_size']}, "
             f"S = {a.samples} weight draws at test; overrides: {' '.join(a.overrides) or 'none'}", "",
             "| model | params | test error | test NLL (nats) | ECE (15 bins) | train time |", "|---|---|---|---|---|---|"]
    for label, r, minutes, n in rows:
        lines.append(f"| {label} | {n:,} | {100 * r['error']:.2f}% | {r['nll']:.3f} | {100 * r['ece']:.2f}% | "
                     f"{minutes:.1f} min |")
    names = list(next(iter(entropies.values())))
    lines += ["", f"Mean predictive entropy (nats; at most log 10 = 2.303) on the first {a.ood_examples} test images, "
              f"transformed, and as many uniform-noise images:", "",
              "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, h in entropies.items():
        lines.append(f"| {label} | " + " | ".join(f"{h[n]:.3f}" for n in names) + " |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump({"rows": [{"model": lb, **{k: r[k] for k in ("error", "nll", "ece")}, "minutes": m, "params": n}
                            for lb, r, m, n in rows], "entropy": entropies}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except FlowlabError as e:
        sys.exit(f"error: {e}")
