"""What a bits/dim number means: the protocol recorded beside it (``eval.json["protocol"]``, ``eval.py --table``).

A number is comparable with another only when these agree (or differ knowingly):

    data       name, version (the loader's ``source`` sentence), sha256 of the evaluated uint8
               array (N, C, H, W, after bit reduction and truncation), split and count
    bound      dequantizer, what each image's number is (``Flow.likelihood_kind``: single-sample
               bound, importance-weighted with K, exact, estimated), the noise seed
    solver     a CNF's eval-mode solver, tolerances and trace estimator; Residual Flows' estimator
    weights    EMA on/off, sha256 of the evaluated weights and the step (the checkpoint's identity)
    training   global batch (``train.batch_size``: the images of one optimizer step over every
               process and micro-batch), processes, gradient accumulation, augmentations,
               steps and images seen (and epochs of the train split)

``identity`` is the part a stored per-image result must match to be reused (``engine.eval_store``).
"""
from __future__ import annotations

import hashlib

import torch

# model-config keys that decide how an eval-mode log-likelihood is computed (CNF solvers; the
# roulette / truncation of residual flows): recorded when the family has them
SOLVER_KEYS = ("test_solver", "test_atol", "test_rtol", "test_step_size", "trace_eval", "noise",
               "estimator", "roulette_dist", "n_exact_terms_eval", "n_power_series")


def array_sha256(images: torch.Tensor) -> str:
    """sha256 of a uint8 image array's bytes in (N, C, H, W) order."""
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes): the evaluated weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bound_name(kind: str, iw_samples: int) -> str:
    """The per-image number's kind in words: ``Flow.likelihood_kind`` and K."""
    if kind == "bound":
        return "single-sample (K=1)" if iw_samples == 1 else f"importance-weighted (K={iw_samples})"
    return kind


def identity(weights: str, step: int, seed: int, data_sha256: str, count: int, split: str, iw_samples: int) -> dict:
    return {"weights_sha256": weights, "step": step, "seed": seed, "data_sha256": data_sha256, "count": count,
            "split": split, "iw_samples": iw_samples}


def augmentations(data_cfg) -> list[str]:
    out = ["hflip"] if data_cfg.hflip else []
    if data_cfg.translate > 0:
        out.append(f"translate {data_cfg.translate:g}")
    return out


def protocol(cfg, model, info: dict, data, split: str, ident: dict, eval_processes: int, shared_draws: int,
             iw_samples: int) -> dict:
    """The protocol of one evaluation (see the module docstring)."""
    t = cfg.train
    world = info.get("world_size")
    n_train = int(data.train.shape[0]) if getattr(data, "train", None) is not None else None
    return {
        "data": {"name": cfg.data.name, "version": data.source, "sha256": ident["data_sha256"], "split": split,
                 "count": ident["count"], "shape": list(model.data_shape), "n_bits": cfg.data.n_bits},
        "bound": {"kind": model.likelihood_kind, "stochastic": model.is_stochastic, "iw_samples": iw_samples,
                  "name": bound_name(model.likelihood_kind, iw_samples),
                  "dequantizer": dict(cfg.dequantizer), "seed": ident["seed"],
                  "noise": "per image: (seed, image index, sample)",
                  "batch_shared_draws": shared_draws},
        "solver": {k: cfg.model[k] for k in SOLVER_KEYS if k in cfg.model} or None,
        "weights": {"ema": info["ema"], "ema_decay": t.ema if info["ema"] else None,
                    "sha256": ident["weights_sha256"], "step": info["step"]},
        "training": {"global_batch": t.batch_size, "processes": world, "grad_accum_steps": t.grad_accum_steps,
                     "micro_batch": t.batch_size // (world * t.grad_accum_steps) if world else None,
                     "augmentations": augmentations(cfg.data), "steps": info["step"],
                     "images_seen": info["images_seen"],
                     "epochs": round(info["images_seen"] / n_train, 3) if n_train else None},
        "eval_processes": eval_processes,
    }


def solver_text(p: dict) -> str:
    """A CNF's / residual flow's eval settings in a few words (a table cell)."""
    s = p.get("solver")
    if not s:
        return "–"
    if "test_solver" in s:
        step = f" h={s['test_step_size']:g}" if s["test_solver"] in ("rk4", "euler", "midpoint") else ""
        return (f"{s['test_solver']} atol {s['test_atol']:g} rtol {s['test_rtol']:g}{step}, "
                f"trace {s['trace_eval']}" + (f" ({s['noise']})" if s.get("trace_eval") == "hutchinson" else ""))
    if s.get("estimator") == "roulette":
        return f"roulette {s['roulette_dist']}, {s['n_exact_terms_eval']} exact terms"
    return ", ".join(f"{k} {v}" for k, v in s.items())
