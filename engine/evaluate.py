"""Test-set bits/dim (and any per-example score) over a whole split, sharded over processes and gathered.

Every example of the split is scored exactly once (no padding, no duplicates), with
a fixed seed for the dequantization noise so the number is reproducible.

With ``iw_samples = K > 1`` (models with stochastic dequantization) each example's
log-likelihood is the importance-weighted bound ``Flow.log_prob_iw`` over K noise draws,
``iw_chunk`` draws per forward; a forward then holds ``max(1, batch_size // iw_chunk)``
images times ``iw_chunk`` draws, so memory stays that of ``batch_size`` for any K.

``evaluate_scores(score, ...)`` does the same for any per-example scores
``score(model, x) -> {name: (B,)}`` (the objectives' test numbers: NLL in nats, -ELBO and
the importance-sampled -log p(x), the reverse-KL loss on fresh samples).
"""
from __future__ import annotations

import contextlib

import torch

from common.errors import FlowlabError
from data import eval_batches
from engine.metrics import bits_per_dim, mean_and_stderr


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block with a fixed torch seed, restoring the global RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def eval_seed(seed: int, rank: int) -> int:
    """The evaluation noise stream of ``seed`` on ``rank``: never ``seed`` itself, which the
    trainer's data-dependent init draws its noise from (an ActNorm initialised on exactly the
    noise it is then scored on would flatter an untrained model's bits/dim)."""
    return ((seed + 1) * 2_654_435_761 + 7919 * rank) % (2**63 - 1)


@torch.no_grad()
def per_example_bpd(model, images: torch.Tensor, batch_size: int, device, rank: int = 0, world_size: int = 1,
                    seed: int = 0, autocast=contextlib.nullcontext, iw_samples: int = 1,
                    iw_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, bpd) of this rank's share of ``images``."""
    if iw_samples > 1:
        iw_chunk = max(1, min(iw_chunk or iw_samples, iw_samples))
        batch_size = max(1, batch_size // iw_chunk)
    was_training = model.training
    model.eval()
    idx_out, bpd_out = [], []
    with seeded(eval_seed(seed, rank), torch.device(device)):
        for idx in eval_batches(images.shape[0], batch_size, rank, world_size):
            if idx.numel() == 0:
                continue
            x = images[idx].to(device)
            with autocast():
                logp = model.log_prob(x) if iw_samples == 1 else model.log_prob_iw(x, iw_samples, iw_chunk)
            bpd_out.append(bits_per_dim(logp, model.num_dims).cpu())
            idx_out.append(idx)
    model.train(was_training)
    if not idx_out:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(idx_out), torch.cat(bpd_out)


def evaluate_bpd(model, images: torch.Tensor, batch_size: int, accelerator=None, seed: int = 0,
                 iw_samples: int = 1, iw_chunk: int | None = None) -> dict:
    """Mean +- standard error of bits/dim over ``images``; all ranks must call it.

    ``iw_samples`` > 1: the importance-weighted bound with that many samples (needs
    ``model.log_prob_iw``, i.e. an unwrapped ``Flow``).  An empty ``images`` is a one-line error."""
    if images.shape[0] == 0:
        raise FlowlabError("no images to evaluate (the split is empty)")
    if accelerator is None:
        idx, bpd = per_example_bpd(model, images, batch_size, next(model.parameters()).device, seed=seed,
                                   iw_samples=iw_samples, iw_chunk=iw_chunk)
    else:
        from accelerate.utils import gather_object
        idx, bpd = per_example_bpd(model, images, batch_size, accelerator.device, accelerator.process_index,
                                   accelerator.num_processes, seed, accelerator.autocast, iw_samples, iw_chunk)
        parts = gather_object([(idx, bpd)])
        idx, bpd = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    assert idx.numel() == images.shape[0] and torch.unique(idx).numel() == idx.numel(), "eval must cover each example once"
    mean, stderr = mean_and_stderr(bpd)
    return {"bpd": mean, "stderr": stderr, "n": int(idx.numel()), "nonfinite": int((~torch.isfinite(bpd)).sum()),
            "iw_samples": iw_samples}



@torch.no_grad()
def per_example_scores(score, model, examples: torch.Tensor, batch_size: int, device, rank: int = 0,
                       world_size: int = 1, seed: int = 0, autocast=contextlib.nullcontext):
    """(indices, {name: values}) of this rank's share of ``examples``, where
    ``score(model, x) -> {name: (B,) tensor}`` scores a batch (under the eval noise stream
    ``eval_seed(seed, rank)``, model in eval mode)."""
    was_training = model.training
    model.eval()
    idx_out, out = [], {}
    with seeded(eval_seed(seed, rank), torch.device(device)):
        for idx in eval_batches(examples.shape[0], batch_size, rank, world_size):
            if idx.numel() == 0:
                continue
            with autocast():
                scores = score(model, examples[idx].to(device))
            for name, value in scores.items():
                out.setdefault(name, []).append(value.detach().double().cpu())
            idx_out.append(idx)
    model.train(was_training)
    if not idx_out:
        return torch.zeros(0, dtype=torch.long), {}
    return torch.cat(idx_out), {name: torch.cat(v) for name, v in out.items()}


def evaluate_scores(score, model, examples: torch.Tensor, batch_size: int, accelerator=None, seed: int = 0) -> dict:
    """Mean +- standard error of each per-example score over ``examples`` (sharded over the
    accelerator's processes and gathered; all ranks must call it): ``{"n": N, "nonfinite":
    examples with a non-finite score, name: mean, name + "_stderr": its standard error}``."""
    if accelerator is None:
        idx, scores = per_example_scores(score, model, examples, batch_size, next(model.parameters()).device, seed=seed)
    else:
        from accelerate.utils import gather_object
        idx, scores = per_example_scores(score, model, examples, batch_size, accelerator.device,
                                         accelerator.process_index, accelerator.num_processes, seed,
                                         accelerator.autocast)
        parts = [p for p in gather_object([(idx, scores)]) if p[0].numel()]
        idx = torch.cat([p[0] for p in parts])
        scores = {name: torch.cat([p[1][name] for p in parts]) for name in parts[0][1]}
    assert idx.numel() == examples.shape[0] and torch.unique(idx).numel() == idx.numel(), "eval must cover each example once"
    result = {"n": int(idx.numel()), "nonfinite": 0}
    for name, values in scores.items():
        result[name], result[f"{name}_stderr"] = mean_and_stderr(values)
        result["nonfinite"] = max(result["nonfinite"], int((~torch.isfinite(values)).sum()))
    return result
