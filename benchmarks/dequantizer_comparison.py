"""Dequantizers at equal budget: one backbone trained with uniform, variational and argmax
dequantization for the same wall-clock time on equal CPU shares, then scored with the same
bounds (single-sample on the whole test split, importance-weighted on its first N images).

    python benchmarks/dequantizer_comparison.py [--config experiments/flowpp_small.yaml]
        [--minutes 10] [--iw-samples 16] [--iw-max-examples 256] [--out runs/dequantizer_comparison]
        [any other benchmarks/equal_budget.py option, e.g. --set train.lr=2e-3]

uniform:     y = (x + u) / 2^n, u ~ U(0, 1)                       (Theis et al. 2016, arXiv:1511.01844)
variational: u ~ q(u | x), Flow++'s conditional flow              (Ho et al. 2019, arXiv:1902.00275)
argmax:      every value a category, binary-encoded, z ~ q(z | x) with decode(z) = x
             (Hoogeboom et al. 2021, arXiv:2102.05379); the backbone sees 8x the channels for 8-bit data
(``dequantizer.kind``; the config's other ``dequantizer`` knobs size q for variational and argmax.)
All three give lower bounds on log P(x) of the same discrete images, in bits per sub-pixel.
Runs three at a time with one thread each (``benchmarks/equal_budget.py`` does the work).
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEQUANTIZERS = ("uniform", "variational", "argmax")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/flowpp_small.yaml",
                        help="a config of a continuous family (glow, flowpp, realnvp, ffjord, resflow)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--iw-samples", type=int, default=16)
    parser.add_argument("--iw-max-examples", type=int, default=256)
    parser.add_argument("--out", default="runs/dequantizer_comparison")
    args, rest = parser.parse_known_args()
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "equal_budget.py"),
           *(f"{args.config}::dequantizer.kind={d}" for d in DEQUANTIZERS),
           "--minutes", str(args.minutes), "--threads", "1", "--parallel", str(len(DEQUANTIZERS)),
           "--out", args.out, "--iw-samples", str(args.iw_samples), "--iw-max-examples", str(args.iw_max_examples),
           "--set", "train.eval_every=0", "--set", "train.sample_every=0", *rest]
    print(" ".join(cmd[1:]), flush=True)
    sys.exit(subprocess.call(cmd, cwd=ROOT))


if __name__ == "__main__":
    main()
