"""Where a training step's time goes: top operators, the kernel floor, and per-layer costs.

    python benchmarks/profile_step.py CONFIG.yaml [section.key=value ...]
        [--warmup N] [--top N] [--no-layers] [--json out.json]

e.g.  python benchmarks/profile_step.py experiments/glow_cifar10.yaml train.batch_size=16

Prints three things for one trainer step (``Trainer.train_step``, after ``--warmup`` untimed steps):

1. the ``--top`` operators by self time (``torch.profiler``; CUDA time on a GPU);
2. the **kernel floor**: the self time of the convolution and matrix-multiply kernels
   (forward and backward) as a share of the step.  A step cannot be faster than its
   floor at the same architecture and precision, so ``step / floor`` says how much any
   non-layout work could still give; the same measure of a reference implementation
   (``summarize`` on its step) tells whether two codes are held by the same floor;
3. counts of what costs without computing: dtype casts (``aten::_to_copy``), copies,
   and host synchronisations (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``);
4. per top-level layer of the flow (grouped by class), the forward and backward time of
   the layer alone on its own input (``--no-layers`` skips it).

The last line is one JSON object with the figures.  Timings on a shared CPU drift:
compare shares and counts, or runs made one after the other.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.throughput import get_data, sync
from common.errors import FlowlabError
from engine.cli import run_cli
from engine.config import load_config
from engine.sections import RunConfig
from engine.trainer import Trainer

# The operators whose time is the architecture's arithmetic (convolutions and matmuls).
KERNEL_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
              "aten::_slow_conv2d_backward", "aten::thnn_conv2d", "aten::cudnn_convolution",
              "aten::_convolution_depthwise2d", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
              "aten::_efficient_attention_backward", "aten::_flash_attention_backward")
CAST_OPS, COPY_OPS, SYNC_OPS = ("aten::_to_copy",), ("aten::copy_",), ("aten::_local_scalar_dense",)


def summarize(prof, step_seconds: float, top: int = 15, device_time: bool = False) -> dict:
    """Top operators, kernel floor and cast/copy/sync counts of a finished ``torch.profiler`` run."""
    attr = "self_device_time_total" if device_time else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events) / 1e6 or float("nan")
    by_name = {e.key: e for e in events}

    def seconds(names):
        return sum(getattr(by_name[n], attr) for n in names if n in by_name) / 1e6

    def count(names):
        return sum(by_name[n].count for n in names if n in by_name)

    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    floor = seconds(KERNEL_OPS)
    return {
        "step_seconds": round(step_seconds, 4), "profiled_seconds": round(total, 4),
        "kernel_floor_seconds": round(floor, 4), "kernel_share": round(floor / total, 4),
        "casts": count(CAST_OPS), "copies": count(COPY_OPS), "host_syncs": count(SYNC_OPS),
        "top": [{"op": e.key, "seconds": round(getattr(e, attr) / 1e6, 4), "share": round(getattr(e, attr) / 1e6 / total, 4),
                 "calls": e.count} for e in ranked],
    }


def profile_callable(step, device: torch.device, top: int = 15) -> dict:
    """Profile one call of ``step()`` (already warmed up) and summarise it."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        seconds = time.perf_counter() - start
    return summarize(prof, seconds, top, device_time=device.type == "cuda")


def layer_times(model, x: torch.Tensor, device: torch.device) -> list[dict]:
    """Forward and backward seconds of each top-level layer alone on its own input, by class."""
    totals = collections.defaultdict(lambda: [0, 0.0, 0.0])
    z = x
    for t in model.transforms:
        z_in = z.detach().requires_grad_(z.is_floating_point())
        sync(device)
        start = time.perf_counter()
        out, ldj = t(z_in)
        sync(device)
        forward = time.perf_counter() - start
        loss = ldj.float().sum() + (out.float() * torch.randn_like(out.float())).sum()
        backward = 0.0
        if loss.requires_grad:
            start = time.perf_counter()
            loss.backward()
            sync(device)
            backward = time.perf_counter() - start
        row = totals[type(t).__name__]
        row[0], row[1], row[2] = row[0] + 1, row[1] + forward, row[2] + backward
        z = out.detach()
    model.zero_grad(set_to_none=True)
    return sorted(({"layer": k, "count": n, "forward_s": round(f, 4), "backward_s": round(b, 4)}
                   for k, (n, f, b) in totals.items()), key=lambda r: -(r["forward_s"] + r["backward_s"]))


def print_report(name: str, s: dict, layers: list[dict] | None) -> None:
    print(f"## {name}: one step {s['step_seconds']:.3f} s (profiled {s['profiled_seconds']:.3f} s of operator time)")
    print(f"kernel floor (conv + matmul kernels): {s['kernel_floor_seconds']:.3f} s = {100 * s['kernel_share']:.1f}% "
          f"of the step; dtype casts {s['casts']}, copies {s['copies']}, host syncs {s['host_syncs']}\n")
    print("| operator | seconds | share | calls |\n| --- | --- | --- | --- |")
    for r in s["top"]:
        print(f"| {r['op']} | {r['seconds']:.3f} | {100 * r['share']:.1f}% | {r['calls']} |")
    if layers:
        print("\n| layer (top level) | count | forward s | backward s |\n| --- | --- | --- | --- |")
        for r in layers:
            print(f"| {r['layer']} | {r['count']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default 2)")
    parser.add_argument("--top", type=int, default=15, help="operators to list (default 15)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer forward/backward table")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_intermixed_args()
    if args.warmup < 0 or args.top < 1:
        raise FlowlabError("--warmup must be >= 0 and --top >= 1")
    cfg = RunConfig.from_resolved(load_config(args.config, args.overrides))
    data, _ = get_data(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=data, tensorboard=False)
        device = trainer.acc.device
        for i in range(args.warmup):
            trainer.train_step(i)
        summary = profile_callable(lambda: trainer.train_step(args.warmup), device, args.top)
        layers = None
        if not args.no_layers and hasattr(trainer.model, "transforms"):
            layers = layer_times(trainer.model, trainer._batch(0), device)
    print_report(args.config + (" " + " ".join(args.overrides) if args.overrides else ""), summary, layers)
    print(json.dumps({"config": args.config, "overrides": args.overrides, **summary, "layers": layers}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, **summary, "layers": layers}, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
