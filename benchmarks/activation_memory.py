"""Peak memory and img/s of one config under each ``train.activation_memory``, and the gradient
difference against plain backprop; prints a markdown table (and one JSON line per setting).

    python benchmarks/activation_memory.py experiments/glow_cifar10.yaml [--batch 16 64] [--steps 1 --warmup 1]
        [--modes store checkpoint invertible] [section.key=value ...]

Each (batch, mode) runs in a fresh process (``--one``): the trainer is built (data-dependent init
on ``train.init_batch_size`` images), then ``--warmup`` untimed and ``--steps`` timed trainer steps
(``Trainer.train_step``).  Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the steps; on
the CPU the process's peak resident set (VmHWM), reset just before the first step (Linux
``/proc/self/clear_refs``), so the figure is the steps' high-water mark: weights, gradients,
optimizer state and the activations a step keeps ("delta": above the resident set before the
first step).  Gradients (``--grad-batch``, one process): one batch, the same weights and noise,
the gradient of every parameter under each mode against ``store``'s (max |difference|, and
relative to the largest |gradient|), and the float32 drift of the inputs invertible backprop
rebuilds (max |x_rec - x| at the start of each invertible segment, ``reconstruction_errors``).
Data: the config's data set when it loads, otherwise random images of its shape
(``benchmarks/throughput.py: get_data``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.throughput import get_data, sync
from common.errors import FlowlabError
from engine.cli import run_cli
from engine.config import load_config
from engine.sections import RunConfig
from models.core.activation_memory import MODES, reconstruction_errors, set_activation_memory


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise FlowlabError(f"/proc/self/status has no {field} (the CPU memory figure needs Linux)")


def run_one(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """One setting in this process: trainer steps, their time and peak memory."""
    from engine.trainer import Trainer

    cfg = RunConfig.from_resolved(load_config(config, overrides))
    data, data_kind = get_data(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=data, tensorboard=False)
        device = trainer.acc.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one
            before = _rss_mb("VmRSS")
        times = []
        for i in range(warmup + steps):
            sync(device)
            start = time.perf_counter()
            trainer.train_step(i)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb("VmHWM")
    sec = statistics.median(times)
    return {"batch_size": cfg.train.batch_size, "activation_memory": cfg.train.activation_memory,
            "device": str(device), "threads": torch.get_num_threads(), "data": data_kind,
            "sec_per_step": round(sec, 3), "img_per_s": round(cfg.train.batch_size / sec, 3),
            "peak_mb": round(peak, 1), "before_mb": round(before, 1), "delta_mb": round(peak - before, 1),
            "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_of_the_steps",
            "plan": trainer.memory_plan}


def gradient_differences(config: str, overrides: list[str], batch: int, modes) -> dict:
    """Max |grad - store's grad| per mode on one batch (same weights, same noise), and the drift."""
    from engine.metrics import bits_per_dim
    from engine.setup import make_model

    cfg = RunConfig.from_resolved(load_config(config, overrides))
    data, _ = get_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, data.shape, data.n_bits)
    x = data.train[:batch]
    torch.manual_seed(cfg.train.seed)
    model.data_init(x)

    def grads(mode):
        set_activation_memory(model, mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        start = time.perf_counter()
        log_p, aux = model(x, return_aux=True)
        loss = bits_per_dim(log_p, model.num_dims).mean() + sum(aux.values())
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, \
            time.perf_counter() - start

    ref, _ = grads("store")
    scale = max(g.abs().max().item() for g in ref.values())
    out = {"grad_batch": batch, "max_abs_grad": scale}
    for mode in modes:
        if mode == "store":
            continue
        g, _ = grads(mode)
        diff = max((g[n] - ref[n]).abs().max().item() for n in ref)
        out[mode] = {"max_abs_diff": diff, "max_rel_diff": diff / scale}
    if "invertible" in modes:
        set_activation_memory(model, "invertible")
        torch.manual_seed(1)
        out["reconstruction_errors"] = reconstruction_errors(model, x)  # the dequantizer runs plainly
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per setting (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--grad-batch", type=int, default=4, help="batch of the gradient comparison (0: skip)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one setting, this process
    args = parser.parse_intermixed_args()
    if args.one:
        print(json.dumps(run_one(args.config, args.overrides, args.steps, args.warmup)), flush=True)
        return
    rows = []
    for batch in args.batch:
        for mode in args.modes:
            argv = [sys.executable, os.path.abspath(__file__), args.config, *args.overrides,
                    f"train.batch_size={batch}", f"train.activation_memory={mode}", "--one",
                    "--steps", str(args.steps), "--warmup", str(args.warmup)]
            start = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise FlowlabError(f"setting batch {batch}, {mode} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    grads = gradient_differences(args.config, args.overrides, args.grad_batch, args.modes) if args.grad_batch else {}
    if grads:
        print(json.dumps(grads), flush=True)
    print(f"\n| batch | activation_memory | img/s | s/step | peak MB ({rows[0]['memory_kind']}) | above weights+data MB "
          f"| max abs grad diff vs store |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = grads.get(r["activation_memory"], {})
        diff = "0 (reference)" if r["activation_memory"] == "store" else (
            f"{d['max_abs_diff']:.2e} ({d['max_rel_diff']:.1e} of max)" if d else "-")
        print(f"| {r['batch_size']} | {r['activation_memory']} | {r['img_per_s']:.2f} | {r['sec_per_step']:.2f} "
              f"| {r['peak_mb']:,.0f} | {r['delta_mb']:,.0f} | {diff} |")


if __name__ == "__main__":
    run_cli(main)
