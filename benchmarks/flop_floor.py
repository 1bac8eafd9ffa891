"""The arithmetic floor of a training step and of sampling, ours and a reference's: how much faster
than the reference could any implementation of the same architecture run on this device?

    python benchmarks/flop_floor.py experiments/glow_cifar10.yaml train.batch_size=16 \
        [--reference glow --refbench ../shared/refbench --refs $REFS [--ref-config paper]] \
        [--warmup 2] [--steps 3] [--sample-n 16] [--threads 2] [--json out.json]

    floor = FLOPs / GEMM rate

FLOPs: the arithmetic (2 per multiply-add) of one training step's convolutions, matrix products and
attention, forward and backward, and of sampling ``--sample-n`` images, counted at dispatch with the
formulas of ``torch.utils.flop_counter`` (every other operation counts as free; ``FlopCounterMode``
itself is not used: its module hooks break an ``autograd.grad`` inside a forward, as Residual Flows'
Neumann-series gradient makes).  GEMM rate: this
device's best rate at a large dense matrix product in the step's compute dtype (float32; bfloat16
under ``train.mixed_precision=bf16``), the best of a few shapes and repeats.  A convolution of the
direct algorithm is built on the same micro-kernels as the matrix product (oneDNN, cuDNN) and does
not run faster than it, so the floor bounds any implementation's time from below at that
arithmetic; only a convolution algorithm with fewer multiplications (Winograd, FFT), which torch's
training paths on the CPU do not use, could go under it.

Printed per side: FLOPs, the measured seconds (median of ``--steps`` after ``--warmup``; one
warm sampling call, then the median of ``--sample-runs``), the floor and measured / floor.  With
``--reference`` (the family's refbench harness run in this process, as ``profile_reference.py``
does; the reference computes in float32 at the harness's batch): the ratio bound, reference
seconds / our floor, the most any code of our architecture could train (sample) faster than the
reference on this device at this precision, beside the measured ratio.  The last line is one JSON
object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.profile_reference import run_harness
from benchmarks.reference_race import FAMILIES
from benchmarks.throughput import get_data, sync
from common.errors import FlowlabError
from engine.cli import check_output_file, run_cli
from engine.config import load_config
from engine.sections import RunConfig
from engine.trainer import Trainer

# (M, K, N) of the products timed for the GEMM rate: the shapes of wide 1x1 convolutions and
# square layers; the best of them is the rate quoted
GEMM_SHAPES = ((4096, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048))


class _FlopCount(TorchDispatchMode):
    """Adds up ``flop_registry``'s formula for every operation it has one for."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn) -> int:
    """FLOPs of the convolutions, matrix products and attention one call of ``fn()`` runs."""
    with _FlopCount() as counter:
        fn()
    return int(counter.total)


def gemm_rate(dtype: torch.dtype, device: torch.device, repeats: int = 8, rounds: int = 3) -> float:
    """The best FLOP/s of ``a @ b`` over ``GEMM_SHAPES`` (``rounds`` timings of ``repeats`` products each)."""
    best = 0.0
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        for _ in range(rounds):
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync(device)
            best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start))
    return best


def median_seconds(fn, device: torch.device, runs: int) -> float:
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_side(step, sample, device: torch.device, warmup: int, steps: int, sample_runs: int) -> dict:
    """FLOPs and median seconds of ``step()`` (after ``warmup`` calls) and of ``sample()`` (None: not measured).
    The counted calls run first: they are warm-ups of their own."""
    for _ in range(warmup):
        step()
    out = {"step_flops": count_flops(step), "step_seconds": median_seconds(step, device, steps)}
    if sample is not None:
        out["sample_flops"] = count_flops(sample)
        out["sample_seconds"] = median_seconds(sample, device, sample_runs)
    return out


def ours(cfg: RunConfig, args) -> tuple[dict, torch.device, torch.dtype]:
    data, _ = get_data(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=data, tensorboard=False)
        device, calls = trainer.acc.device, iter(range(10 ** 9))
        if args.reference and device.type != "cpu":  # before minutes of measuring
            raise FlowlabError(f"--reference compares on the CPU (the harnesses run there); this run is on {device}: "
                               "set ACCELERATE_USE_CPU=1")
        model = trainer.model

        def sample():
            with torch.no_grad(), trainer.acc.autocast():  # the run's precision, as its sample grids
                model.eval().sample(args.sample_n, temperature=1.0)
            model.train()

        figures = measure_side(lambda: trainer.device_step(next(calls)), sample, device, args.warmup, args.steps,
                               args.sample_runs)
    dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
    return figures, device, dtype


def reference(args) -> tuple[str, dict]:
    """The reference's figures through its refbench harness (float32, on the CPU)."""
    results: list = []

    def stand_in(common):
        def run(name, harness_args, model, train_step, eval_bpd=None, sample=None, info=None):
            train, _ = common.load_data()
            batches = common.batches(train, harness_args.batch, harness_args.seed)

            def sample_n():
                with torch.no_grad():
                    sample(args.sample_n)

            results.append((name, measure_side(lambda: train_step(next(batches)), None if sample is None else sample_n,
                                               torch.device("cpu"), args.warmup, args.steps, args.sample_runs)))
        return run

    run_harness(args.reference, args.refbench, args.refs, args.ref_config, args.batch, args.threads, stand_in)
    if not results:
        raise FlowlabError(f"{FAMILIES[args.reference]['harness']} never reached its training loop")
    return results[0]


def floors(figures: dict, rate: float) -> dict:
    out = dict(figures)
    for what in ("step", "sample"):
        if f"{what}_flops" in figures:
            out[f"{what}_floor_seconds"] = figures[f"{what}_flops"] / rate
            out[f"{what}_over_floor"] = figures[f"{what}_seconds"] / out[f"{what}_floor_seconds"]
    return out


def print_table(rows: list[tuple[str, dict]]) -> None:
    print("| side | step GFLOP | step s | floor s | step / floor | sample GFLOP | sample s | floor s | sample / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        sample = (f"{r['sample_flops'] / 1e9:.1f} | {r['sample_seconds']:.3f} | {r['sample_floor_seconds']:.3f} | "
                  f"{r['sample_over_floor']:.2f}" if "sample_flops" in r else "– | – | – | –")
        print(f"| {name} | {r['step_flops'] / 1e9:.1f} | {r['step_seconds']:.3f} | {r['step_floor_seconds']:.3f} | "
              f"{r['step_over_floor']:.2f} | {sample} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps, median (default 3)")
    parser.add_argument("--sample-n", type=int, default=None, help="images to sample (default: the batch size)")
    parser.add_argument("--sample-runs", type=int, default=2, help="timed sampling calls, median (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reference", default=None, choices=sorted(FAMILIES), help="also the reference of this family")
    parser.add_argument("--refbench", default=None, help="folder of the refbench harnesses (with --reference)")
    parser.add_argument("--refs", default=None, help="folder of the reference checkouts (with --reference)")
    parser.add_argument("--ref-config", default="paper", choices=["paper", "small"])
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_intermixed_args()
    if args.warmup < 0 or args.steps < 1 or args.sample_runs < 1 or (args.sample_n is not None and args.sample_n < 1):
        raise FlowlabError("--warmup must be >= 0, --steps, --sample-runs and --sample-n >= 1")
    if args.reference and not (args.refbench and args.refs):
        raise FlowlabError("--reference needs --refbench and --refs")
    if args.json:
        check_output_file(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig.from_resolved(load_config(args.config, args.overrides))
    args.batch = cfg.train.batch_size
    args.sample_n = args.sample_n or args.batch
    args.threads = torch.get_num_threads()
    mine, device, dtype = ours(cfg, args)
    rate = gemm_rate(dtype, device)
    rows = [("ours", floors(mine, rate))]
    if args.reference:
        name, theirs = reference(args)
        ref_rate = rate if dtype == torch.float32 else gemm_rate(torch.float32, torch.device("cpu"))
        rows.append((f"reference: {name}", floors(theirs, ref_rate)))
    title = args.config + (" " + " ".join(args.overrides) if args.overrides else "")
    print(f"## {title}: batch {args.batch}, {args.sample_n} sampled, {args.threads} threads on {device}; "
          f"GEMM rate {rate / 1e9:.1f} GFLOP/s ({str(dtype).replace('torch.', '')})\n")
    print_table(rows)
    out = {"config": args.config, "overrides": args.overrides, "batch": args.batch, "sample_n": args.sample_n,
           "device": str(device), "dtype": str(dtype).replace("torch.", ""), "gemm_flops_per_s": rate,
           "ours": rows[0][1]}
    if args.reference:
        theirs = rows[1][1]
        out["reference"] = {"name": rows[1][0].removeprefix("reference: "), **theirs}
        bounds = {"train_ratio_measured": theirs["step_seconds"] / mine["step_seconds"],
                  "train_ratio_bound": theirs["step_seconds"] / rows[0][1]["step_floor_seconds"]}
        if "sample_seconds" in theirs:
            bounds.update(sample_ratio_measured=theirs["sample_seconds"] / mine["sample_seconds"],
                          sample_ratio_bound=theirs["sample_seconds"] / rows[0][1]["sample_floor_seconds"])
        out.update(bounds)
        print(f"\ntraining: measured {bounds['train_ratio_measured']:.2f}x the reference; no implementation of this "
              f"architecture can exceed {bounds['train_ratio_bound']:.2f}x here (reference step / our floor)")
        if "sample_ratio_bound" in bounds:
            print(f"sampling: measured {bounds['sample_ratio_measured']:.2f}x; bound {bounds['sample_ratio_bound']:.2f}x")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
