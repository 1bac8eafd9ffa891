"""Training and sampling throughput of one config; prints ONE JSON line.

    python benchmarks/throughput.py CONFIG.yaml [section.key=value ...]
        [--steps N] [--warmup N] [--sample-n N]

e.g.  python benchmarks/throughput.py experiments/glow_small.yaml train.batch_size=16

A timed step is exactly the trainer's step (``engine.trainer.Trainer.device_step``, what
``fit`` runs: autocast when train.mixed_precision=bf16, the forward (compiled under
train.compile), the objective (mean bits/dim + auxiliary losses) and backward over
train.grad_accum_steps micro-batches, grad-norm clipping, the guarded optimizer step, EMA and
after-step hooks), after the trainer's own data-dependent init.  On CUDA each timed region is
bracketed by torch.cuda.synchronize().  The first step is never timed (compilation, cuDNN
autotuning): first_step_seconds, and compile_seconds = first step - median step when
train.compile is on (0 otherwise; "compile_fallback" says why a family ran eagerly).
sec_per_step is the median over --steps timed steps after --warmup further untimed ones;
train_img_per_s = batch_size / sec_per_step.
sample_seconds times one model.sample(N, temperature=1.0) under no_grad, in the run's precision
(bf16 autocast under train.mixed_precision=bf16, as the trainer's sample grids and sample.py).
"diagnostics": the model's ``diagnostics()`` hook after the last timed step (e.g. a CNF's
forward/backward NFE of that step), when the model has one.
Data: the config's data set when it loads, otherwise (a FlowlabError, e.g. CIFAR-10
absent offline) random uint8 images of the data set's shape ("data": "random").
The device is accelerate's choice (a GPU when there is one; ACCELERATE_USE_CPU=1 forces the CPU).
Memory: CUDA -> torch.cuda.max_memory_allocated; CPU -> peak RSS of the whole process.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from common.errors import FlowlabError
from data import ImageDataset
from engine.cli import run_cli
from engine.compile import EAGER_FAMILIES, compile_fallback, is_compiled
from engine.config import load_config
from engine.sections import RunConfig
from engine.setup import count_parameters, load_data
from engine.trainer import Trainer

RANDOM_SHAPES = {"cifar10": (3, 32, 32), "npz": (3, 32, 32), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28)}


def get_data(cfg: RunConfig) -> tuple[ImageDataset, str]:
    """The config's data set, or random images of its shape when it cannot be loaded."""
    try:
        return load_data(cfg), "real"
    except FlowlabError as err:
        shape, n_bits = RANDOM_SHAPES[cfg.data.name], cfg.data.n_bits
        gen = torch.Generator().manual_seed(cfg.train.seed)
        n = max(cfg.train.batch_size, cfg.train.init_batch_size, 256)
        x = torch.randint(0, 2 ** n_bits, (n, *shape), generator=gen, dtype=torch.uint8)
        return ImageDataset(x, x[:16], n_bits, "random", f"random uint8 {shape} images ({err})"), "random"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss_process"


def measure(cfg: RunConfig, data: ImageDataset, steps: int, warmup: int, sample_n: int) -> dict:
    """Train ``warmup`` untimed and ``steps`` timed steps of the trainer (``Trainer.device_step``,
    the step ``fit`` takes), then time ``model.sample(sample_n)``; on CUDA every timed region is
    bracketed by ``torch.cuda.synchronize`` and the peak memory counter is reset first.  The
    first step (compilation under ``train.compile``, cuDNN autotuning) is never timed:
    ``first_step_seconds`` is reported, and ``compile_seconds`` = first step - median step when
    the forward is compiled."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=data, tensorboard=False)
        device = trainer.acc.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, flags = [], []
        for i in range(1 + warmup + steps):
            sync(device)
            start = time.perf_counter()
            flags.append(trainer.device_step(i)[1])
            sync(device)
            times.append(time.perf_counter() - start)
        diagnostics = trainer.model.diagnostics() if hasattr(trainer.model, "diagnostics") else {}
        model = trainer.model.eval()
        torch.manual_seed(cfg.train.seed)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), trainer.acc.autocast():  # the run's precision, as its sample grids
            model.sample(sample_n, temperature=1.0)
        sync(device)
        sample_seconds = time.perf_counter() - start
        peak_mb, memory_kind = peak_memory(device)
        compiled, fallback = is_compiled(trainer.model), compile_fallback(trainer.model)
        cpu_malloc = trainer.cpu_malloc
        if cfg.train.compile != "none" and cfg.model["name"] in EAGER_FAMILIES:
            fallback = "not compiled: " + EAGER_FAMILIES[cfg.model["name"]]
    sec_per_step = statistics.median(times[1 + warmup:])
    return {"device": str(device), "params": count_parameters(model), "train_img_per_s": round(cfg.train.batch_size / sec_per_step, 3),
            "sec_per_step": round(sec_per_step, 5), "first_step_seconds": round(times[0], 4),
            "compile_seconds": round(max(times[0] - sec_per_step, 0.0), 4) if compiled else 0.0,
            "compile_fallback": fallback, "nonfinite_steps": int((~torch.stack(flags)).sum()),
            "sample_n": sample_n, "sample_seconds": round(sample_seconds, 4),
            "peak_memory_mb": round(peak_mb, 1), "memory_kind": memory_kind, "cpu_malloc": cpu_malloc,
            "diagnostics": {k: round(float(v), 5) for k, v in diagnostics.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps after the first (default 3)")
    parser.add_argument("--sample-n", type=int, default=None, help="images to sample (default: the batch size)")
    args = parser.parse_intermixed_args()
    if args.steps < 1 or args.warmup < 0:
        raise FlowlabError("--steps must be >= 1 and --warmup >= 0")
    cfg = RunConfig.from_resolved(load_config(args.config, args.overrides))
    bs = cfg.train.batch_size
    data, data_kind = get_data(cfg)
    if data.train is not None and data.train.shape[0] < bs:  # (no data: energy fits draw their batches)
        raise FlowlabError(f"train.batch_size={bs} exceeds the {data.train.shape[0]} training images")
    result = measure(cfg, data, args.steps, args.warmup, args.sample_n or bs)
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "model": cfg.model["name"],
        "torch_threads": torch.get_num_threads(), "batch_size": bs,
        "data": data_kind, "data_source": data.source, "mixed_precision": cfg.train.mixed_precision,
        "compile": cfg.train.compile, "activation_memory": cfg.train.activation_memory, "warmup_steps": args.warmup, "timed_steps": args.steps, **result,
    }), flush=True)


if __name__ == "__main__":
    run_cli(main)
