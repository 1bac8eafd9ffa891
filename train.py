"""Train a flow model.

    python train.py CONFIG.yaml [--out RUN_DIR] [--resume] [section.key=value ...]
    python train.py CONFIG.yaml --print-config [section.key=value ...]
    accelerate launch [--num_processes N] train.py CONFIG.yaml ...

The run directory gets the resolved config, checkpoint.pt, TensorBoard logs (tb/),
metrics.jsonl, sample grids (samples/) and summary.json.
"""
import argparse
import os

from engine.cli import run_cli
from engine.config import dump_config, load_config
from engine.sections import RunConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. experiments/glow_cifar10.yaml")
    parser.add_argument("--out", help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (base files, overrides and defaults applied) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.name=npz")
    args = parser.parse_intermixed_args()
    resolved = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(resolved), end="")
        return
    cfg = RunConfig.from_resolved(resolved)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    from engine.trainer import run_training
    run_training(cfg, out, resume=args.resume)


if __name__ == "__main__":
    run_cli(main)
