"""Per-image scores whose noise depends only on (seed, image index, sample number).

A stochastic flow draws its noise (dequantization u ~ q(u|x), argmax noise, Hutchinson
probes) from torch's global RNG, one tensor per batch, so an image's draw depends on which
images share its batch, on the process it landed on and on where a resumed run restarted.
Here every random tensor of the forward whose leading dimension is the batch is filled row
by row, row r from its own CPU generator seeded by

    seed_r = mix(seed, stream, index_r, sample_r)

(``index_r`` the image's position in the evaluated split, ``sample_r`` the importance sample
0..K-1), so image i gets the same noise on 1 or 8 processes, in any batch, before and after a
resume, on a CPU or a GPU.  Draws without a batch dimension (a Russian-roulette term count,
shared by the batch by construction) come from the global RNG seeded from the batch's first
row; they are counted (``NoisePerImage.shared_draws``) because those numbers then depend on
the batch layout.

``image_bpd`` scores given images: the single-sample bound log p(x + u) - log q(u|x) (K = 1),
or the importance-weighted bound (Burda et al. 2016, arXiv:1509.00519)

    log p_K(x) = log (1/K) sum_k exp(L_k),   L_k = log p(x + u_k) - log q(u_k | x),

accumulated over chunks of draws with a running log-sum-exp, as ``Flow.log_prob_iw`` does,
but with row keys that make sample k of image i the same whatever the chunking.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.metrics import bits_per_dim

_MASK = 2**64 - 1
STREAM_SINGLE, STREAM_IW = 0, 1  # independent noise for the K=1 bound and the IW bound


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby keys give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h & (2**63 - 1)


_aten = torch.ops.aten
_FACTORIES = {_aten.rand.default: "uniform", _aten.randn.default: "normal"}
_LIKE = {_aten.rand_like.default: "uniform", _aten.randn_like.default: "normal"}
_INPLACE = {_aten.uniform_.default: "uniform", _aten.normal_.default: "normal"}
_RANDINT = {_aten.randint.low: 3, _aten.randint.default: 2}  # position of the size argument + 1


class NoisePerImage(TorchDispatchMode):
    """Inside it, random tensors with ``len(row_seeds)`` rows get row r's values from the
    generator seeded by ``row_seeds[r]`` (its stream continues over the draws of the block)."""

    def __init__(self, row_seeds: list[int]):
        super().__init__()
        self.rows = len(row_seeds)
        self.generators = [torch.Generator().manual_seed(s) for s in row_seeds]
        self.shared_draws = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing here is compiled: spares every process the ~seconds of importing torch._dynamo

    def _rows(self, kind: str, shape, dtype, device, low=0, high=None) -> torch.Tensor:
        draw_dtype = dtype if kind == "int" or dtype in (torch.float32, torch.float64) else torch.float32
        out = []
        for g in self.generators:
            if kind == "uniform":
                out.append(torch.rand(shape, generator=g, dtype=draw_dtype))
            elif kind == "normal":
                out.append(torch.randn(shape, generator=g, dtype=draw_dtype))
            else:
                out.append(torch.randint(low, high, shape, generator=g, dtype=draw_dtype))
        return torch.stack(out).to(device=device, dtype=dtype)

    def _batched(self, shape) -> bool:
        return len(shape) >= 1 and shape[0] == self.rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is None:
            if func in _FACTORIES and self._batched(args[0]):
                dtype = kwargs.get("dtype") or torch.get_default_dtype()
                return self._rows(_FACTORIES[func], tuple(args[0][1:]), dtype, kwargs.get("device") or "cpu")
            if func in _LIKE and self._batched(args[0].shape):
                t = args[0]
                return self._rows(_LIKE[func], tuple(t.shape[1:]), kwargs.get("dtype") or t.dtype,
                                  kwargs.get("device") or t.device)
            if func in _RANDINT and self._batched(args[_RANDINT[func] - 1]):
                low, high = (args[0], args[1]) if func is _aten.randint.low else (0, args[0])
                shape = tuple(args[_RANDINT[func] - 1][1:])
                return self._rows("int", shape, kwargs.get("dtype") or torch.int64, kwargs.get("device") or "cpu",
                                  low, high)
            if func in _INPLACE and self._batched(args[0].shape):
                t = args[0]
                values = self._rows(_INPLACE[func], tuple(t.shape[1:]), t.dtype, t.device)
                a, b = (list(args[1:3]) + [None, None])[:2]
                if func is _aten.uniform_.default:
                    lo, hi = kwargs.get("from", 0.0 if a is None else a), kwargs.get("to", 1.0 if b is None else b)
                    values = lo + (hi - lo) * values
                else:
                    mean, std = kwargs.get("mean", 0.0 if a is None else a), kwargs.get("std", 1.0 if b is None else b)
                    values = mean + std * values
                return t.copy_(values)
            if torch.Tag.nondeterministic_seeded in func.tags and "attention" not in func.__name__:
                self.shared_draws += 1  # (attention kernels carry the tag for their dropout, off in eval)
        return func(*args, **kwargs)


@contextlib.contextmanager
def noise_per_image(row_seeds: list[int], device: torch.device):
    """The ``NoisePerImage`` mode, with the global RNG (for batch-shared draws) seeded from the
    first row and restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mix(row_seeds[0], 0x5EED))
        mode = NoisePerImage(row_seeds)
        with mode:
            yield mode


@torch.no_grad()
def image_bpd(model, images: torch.Tensor, indices: torch.Tensor, batch_size: int, seed: int, device,
              iw_samples: int = 1, iw_chunk: int | None = None, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, int]:
    """(bits/dim of ``images[indices]`` as float64, batch-shared random draws seen).

    ``iw_samples`` = K > 1: the importance-weighted bound, ``iw_chunk`` draws per forward and
    ``max(1, batch_size // iw_chunk)`` images per forward; K = 1: ``batch_size`` images per forward."""
    device = torch.device(device)
    k = iw_samples
    chunk = max(1, min(iw_chunk or k, k))
    per_forward = batch_size if k == 1 else max(1, batch_size // chunk)
    stream = STREAM_SINGLE if k == 1 else STREAM_IW
    was_training = model.training
    model.eval()
    out, shared = [], 0
    try:
        for start in range(0, indices.numel(), per_forward):
            idx = indices[start:start + per_forward]
            x = images[idx].to(device)
            acc = torch.full((idx.numel(),), -math.inf, dtype=torch.float64, device=device)
            for s0 in range(0, k, chunk):
                n = min(chunk, k - s0)
                seeds = [mix(seed, stream, int(i), s) for s in range(s0, s0 + n) for i in idx]  # sample-major rows
                xs = x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])
                with noise_per_image(seeds, device) as mode, autocast():
                    lp = model.log_prob(xs).double().reshape(n, x.shape[0])
                shared += mode.shared_draws
                acc = torch.logaddexp(acc, torch.logsumexp(lp, dim=0))
            out.append(bits_per_dim(acc - math.log(k), model.num_dims).double().cpu())
    finally:
        model.train(was_training)
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)), shared
