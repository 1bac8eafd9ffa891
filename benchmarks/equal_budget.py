"""Train several configs for the same wall-clock budget, then evaluate and tabulate them.

    python benchmarks/equal_budget.py CONFIG.yaml [CONFIG.yaml ...] --minutes 10
        [--threads 1] [--parallel 2] [--out runs/equal_budget] [--set key=value ...] [--iw-samples K]

Each config runs ``train.py CONFIG --out OUT/<name> train.time_limit_minutes=M`` with
``--threads`` CPU threads (OMP/MKL and torch), ``--parallel`` runs at a time, so every
run gets the same share of the machine.  Then ``eval.py`` scores each run on its test
split and a markdown table is printed: steps and images reached in the budget, test
bits/dim (single-sample, and importance-weighted when --iw-samples > 1).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at the same time")
    parser.add_argument("--out", default="runs/equal_budget")
    parser.add_argument("--set", action="append", default=[], help="override for every run, e.g. train.eval_every=0")
    parser.add_argument("--iw-samples", type=int, default=1)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    names = [os.path.splitext(os.path.basename(c))[0] for c in args.configs]
    pending = list(zip(names, args.configs))
    running = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, config = pending.pop(0)
            out = os.path.join(args.out, name)
            cmd = [sys.executable, "train.py", config, "--out", out, "train.steps=10000000",
                   f"train.time_limit_minutes={args.minutes}", *args.set]
            os.makedirs(args.out, exist_ok=True)
            log = open(os.path.join(args.out, f"{name}.log"), "w")
            print(f"start {name}: {' '.join(cmd[1:])}", flush=True)
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                item[2].close()
                print(f"done {item[0]} (exit {item[1].returncode})", flush=True)
    rows = []
    for name in names:
        out = os.path.join(args.out, name)
        js = os.path.join(out, "eval.json")
        proc = subprocess.run([sys.executable, "eval.py", out, "--json", js, "--iw-samples", str(args.iw_samples)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append(f"| {name} | failed: {proc.stderr.strip()[:120]} | | | | |")
            continue
        r = json.load(open(os.path.join(ROOT, js)))
        iw = f"{r['iw']['bpd']:.3f} ± {r['iw']['stderr']:.3f} (K={r['iw']['k']})" if r.get("iw") else "–"
        rows.append(f"| {name} | {r['num_params']:,} | {r['step']:,} | {r['images_seen']:,} | "
                    f"{r['bpd']:.3f} ± {r['stderr']:.3f} | {iw} |")
    print(f"\n{args.minutes:g} min each, {args.threads} thread(s) per run, {args.parallel} at a time\n")
    print("| config | params | steps | images seen | test bpd (K=1) | test bpd (IW) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
