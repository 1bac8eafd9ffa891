"""bits/dim of paper-size models under bf16 autocast against float32, on the same images and noise.

    python benchmarks/bf16_bpd.py experiments/glow_cifar10.yaml experiments/idf_cifar10.yaml \
        [--steps 20] [--batch 16] [--eval-n 64] [--set data.name=npz --set data.path=$CIFAR_NPZ]

``tests/test_gpu_path.py`` checks bf16 on every family's tiny config; this checks the paper
configurations' deep conditioners (Glow's 512-channel nets, IDF's DenseNets, ...), which only a
device with bf16 arithmetic (a GPU, an AVX-512-BF16 CPU) evaluates in reasonable time.  Per config:
the trainer's data-dependent init and ``--steps`` steps of the trainer (``Trainer.device_step``, in
the config's precision, batch ``--batch``), then bits/dim of the first ``--eval-n`` test images in
float32 and under bf16 autocast (``engine.per_image`` noise streams: the same dequantization
noise and estimator draws for both).  Prints one markdown table: config, params, steps, float32
bits/dim, bf16 bits/dim, bf16 - float32 (mean and max over images).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.throughput import get_data
from common.errors import FlowlabError
from engine.cli import run_cli
from engine.config import load_config
from engine.per_image import image_bpd
from engine.sections import RunConfig
from engine.setup import count_parameters
from engine.trainer import Trainer


def check(config: str, overrides: list[str], steps: int, batch: int, eval_n: int) -> dict:
    cfg = RunConfig.from_resolved(load_config(config, [f"train.batch_size={batch}", f"train.init_batch_size={batch}",
                                                       "train.ema=0", *overrides]))
    data, _ = get_data(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=data, tensorboard=False)
        for i in range(steps + 1):  # the first is the trainer's step 0
            trainer.device_step(i)
        model, device = trainer.model.eval(), trainer.acc.device
        images = data.test[:eval_n]
        bpd = {}
        for name, autocast in (("float32", contextlib.nullcontext),
                               ("bf16", lambda: torch.autocast(device.type, dtype=torch.bfloat16))):
            with torch.no_grad():
                bpd[name], _ = image_bpd(model, images, torch.arange(len(images)), min(batch, eval_n), cfg.train.seed,
                                         device, autocast=autocast)
    diff = bpd["bf16"].double() - bpd["float32"].double()
    return {"config": config, "params": count_parameters(model), "steps": steps,
            "float32": float(bpd["float32"].double().mean()), "bf16": float(bpd["bf16"].double().mean()),
            "diff_mean": float(diff.mean()), "diff_max": float(diff.abs().max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=20, help="training steps before the check (default 20)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-n", type=int, default=64, help="test images scored (default 64)")
    parser.add_argument("--set", action="append", default=[], help="a dotted override for every config (repeatable)")
    args = parser.parse_args()
    if args.steps < 0 or args.batch < 1 or args.eval_n < 1:
        raise FlowlabError("--steps must be >= 0, --batch and --eval-n >= 1")
    rows = [check(c, args.set, args.steps, args.batch, args.eval_n) for c in args.configs]
    print("| config | params | steps | float32 bpd | bf16 bpd | bf16 - float32 (mean) | max over images |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params']:,} | {r['steps']} | {r['float32']:.4f} | {r['bf16']:.4f} | "
              f"{r['diff_mean']:+.4f} | {r['diff_max']:.4f} |")


if __name__ == "__main__":
    run_cli(main)
