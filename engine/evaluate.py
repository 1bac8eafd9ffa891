"""Test-set bits/dim (and any per-example score) over a whole split, sharded over processes and gathered.

Every example of the split is scored exactly once (no padding, no duplicates).  Bits/dim
(``evaluate_per_image``, ``evaluate_bpd``) draws each image's noise from its own stream keyed by
(seed, image index) (``engine.per_image``), so the number is the same on any number of
processes and after a resume; ``evaluate_per_image`` also works in chunks through an
``engine.eval_store.EvalStore`` that keeps what is done.

With ``iw_samples = K > 1`` (models with stochastic dequantization) each example's
log-likelihood is the importance-weighted bound over K noise draws,
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
from engine.metrics import mean_and_stderr


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


class Ranks:
    """The processes of an evaluation: ``accelerator``'s, or this process alone."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.rank = 0 if accelerator is None else accelerator.process_index
        self.world = 1 if accelerator is None else accelerator.num_processes
        self.is_main = self.rank == 0

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object
        return gather_object([obj])

    def broadcast(self, obj):
        """``obj`` of the main process, on every process."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([obj])[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()


def auto_chunk_images(iw_samples: int, batch_size: int, iw_chunk: int | None, world: int) -> int:
    """Images per resumable chunk: about 2^16 forward samples, and at least one forward per process."""
    per_forward = batch_size if iw_samples == 1 else max(1, batch_size // max(1, min(iw_chunk or iw_samples, iw_samples)))
    return max(-(-65536 // iw_samples), world * per_forward)


def evaluate_per_image(model, images: torch.Tensor, batch_size: int, accelerator=None, seed: int = 0,
                       iw_samples: int = 1, iw_chunk: int | None = None, store=None, chunk_images: int | None = None,
                       max_chunks: int | None = None, device=None, autocast=None) -> dict:
    """Per-image bits/dim of ``images`` (noise keyed by (seed, image index): ``engine.per_image``),
    chunk by chunk; all ranks must call it.

    Each chunk of ``chunk_images`` not-yet-scored images is split into ``world`` contiguous pieces
    (sizes differing by at most one, so any N works), scored, gathered by index and, with an
    ``engine.eval_store.EvalStore`` (main process), written before the next chunk starts; images
    the store already holds are skipped.  ``max_chunks`` stops after that many chunks (a
    budget, or a test's interruption).  Returns {"values": (N,) float64 array (NaN where not
    done), "complete", "chunks": chunks computed now, "shared_draws": batch-shared random draws}."""
    import numpy as np

    from engine.per_image import image_bpd

    ranks = Ranks(accelerator)
    if device is None:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
    if autocast is None:
        autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    n = images.shape[0]
    if ranks.is_main and store is not None:
        pending, values = store.pending(), store.values.copy()
    else:
        pending, values = np.arange(n), np.full(n, np.nan)
    pending = ranks.broadcast(pending)
    done = np.ones(n, dtype=bool)
    done[pending] = False
    chunk = chunk_images or auto_chunk_images(iw_samples, batch_size, iw_chunk, ranks.world)
    computed = shared = 0
    for start in range(0, len(pending), chunk):
        if max_chunks is not None and computed >= max_chunks:
            break
        mine = torch.as_tensor(pending[start:start + chunk]).tensor_split(ranks.world)[ranks.rank]
        bpd, draws = image_bpd(model, images, mine, batch_size, seed, device, iw_samples, iw_chunk, autocast)
        parts = ranks.gather((mine.numpy(), bpd.numpy(), draws))
        idx = np.concatenate([p[0] for p in parts])
        values[idx] = np.concatenate([p[1] for p in parts])
        done[idx] = True
        shared += sum(p[2] for p in parts)
        if ranks.is_main and store is not None:
            store.record(idx, values[idx], {"world_size": ranks.world})
        ranks.barrier()
        computed += 1
    return {"values": values, "complete": bool(done.all()), "chunks": computed, "shared_draws": shared}


def evaluate_bpd(model, images: torch.Tensor, batch_size: int, accelerator=None, seed: int = 0,
                 iw_samples: int = 1, iw_chunk: int | None = None) -> dict:
    """Mean +- standard error of bits/dim over ``images`` (noise keyed by (seed, image index), so
    the number does not depend on the number of processes); all ranks must call it.

    ``iw_samples`` > 1: the importance-weighted bound with that many samples.  An empty
    ``images`` is a one-line error."""
    if images.shape[0] == 0:
        raise FlowlabError("no images to evaluate (the split is empty)")
    r = evaluate_per_image(model, images, batch_size, accelerator, eval_seed(seed, 0), iw_samples, iw_chunk,
                           chunk_images=images.shape[0])
    bpd = torch.from_numpy(r["values"])
    mean, stderr = mean_and_stderr(bpd)
    return {"bpd": mean, "stderr": stderr, "n": int(bpd.numel()), "nonfinite": int((~torch.isfinite(bpd)).sum()),
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
