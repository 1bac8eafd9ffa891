"""Discrete Flows against argmax flows and IDF on the same categorical data, at an equal
wall-clock budget: the CIFAR-10 subset at 2 bits per channel (K = 4 categories per sub-pixel).

    python benchmarks/discrete_table.py [--budget 60] [--threads 1] [--out runs/discrete_table]
        [--set key=value ...]     (an override for every run, e.g. --set data.max_test=256)

Runs one after another (each alone on the machine, ``--threads`` CPU threads), each
``train.py CONFIG --out OUT/<name> train.time_limit_minutes=BUDGET/60`` from a fresh directory,
then ``eval.py`` on the test split, and prints a markdown table: parameters, optimizer steps and
images seen in the budget, test bits/dim (mean ± standard error over the split) and what the
number is:

    discrete_flow  experiments/discrete_flow_small.yaml                 exact log P(x)  (mod-K bijections)
    argmax         experiments/argmax_small.yaml data.n_bits=2          single-sample bound (argmax surjection)
    idf            experiments/idf_small.yaml data.n_bits=2             exact log P(x)  (integer bijections)

A uniform model is log2 4 = 2 bits/dim.  (Tran et al. 2019, arXiv:1905.10347; Hoogeboom et al.
2021, arXiv:2102.05379; Hoogeboom et al. 2019, arXiv:1905.07376.)
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.equal_budget import evaluate, train_fresh

RUNS = [
    ("discrete_flow", "experiments/discrete_flow_small.yaml", []),
    ("argmax", "experiments/argmax_small.yaml", ["data.n_bits=2"]),
    ("idf", "experiments/idf_small.yaml", ["data.n_bits=2"]),
]
KINDS = {"exact": "exact", "single-sample (K=1)": "bound (single sample)", "estimated": "estimated"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--out", default="runs/discrete_table")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    if args.budget <= 0 or args.threads < 1:
        parser.error("--budget must be > 0 and --threads >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for name, config, overrides in RUNS:
        out = os.path.join(args.out, name)
        train_args = ["train.steps=10000000", f"train.time_limit_minutes={args.budget / 60}", "train.eval_every=0",
                      "train.sample_every=0", *overrides, *args.set]
        print(f"train {name}: train.py {config} --out {out} {' '.join(train_args)}", flush=True)
        code, seconds = train_fresh(config, out, train_args, env, os.path.join(args.out, f"{name}.log"))
        print(f"  exit {code} after {seconds:.0f} s", flush=True)
        r, err = evaluate(out, os.path.join(out, "eval.json"), env, 1) if code == 0 else (None, f"train.py exit {code}")
        if r is None:
            rows.append(f"| {name} | `{config}` | failed: {(err or '')[:120]} | | | | |")
            continue
        rows.append(f"| {name} | `{' '.join([os.path.basename(config), *overrides])}` | {r['num_params']:,} | "
                    f"{r['step']:,} | {r['images_seen']:,} | {r['bpd']:.3f} ± {r['stderr']:.3f} (n={r['n']}) | "
                    f"{KINDS.get(r['bound'], r['bound'])} |")
    print(f"\nCIFAR-10 subset at 2 bits (K = 4; uniform = 2 bits/dim), {args.budget:g} s of training each, "
          f"{args.threads} thread(s), one run at a time\n")
    print("| model | config | params | steps | images seen | test bpd | kind |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
