"""Train several configs for the same wall-clock budget, then evaluate and tabulate them.

    python benchmarks/equal_budget.py CONFIG.yaml [CONFIG.yaml ...] --minutes 10
        [--threads 1] [--parallel 2] [--out runs/equal_budget] [--set key=value ...] [--iw-samples K]
        [--iw-max-examples N] [--eval-threads T]

A config may carry overrides for its run alone: ``CONFIG.yaml::key=value[::key=value ...]``
(e.g. the same backbone with ``dequantizer.kind=uniform`` and ``=variational``); the run
is then named after the file and the override values (``flowpp_small_uniform``).

Each config runs ``train.py CONFIG --out OUT/<name> train.time_limit_minutes=M`` with
``--threads`` CPU threads (OMP/MKL and torch), ``--parallel`` runs at a time, so every
run gets the same share of the machine.  Then ``eval.py`` scores each run on its test
split and a markdown table is printed: steps and images reached in the budget, test
bits/dim (single-sample, and importance-weighted when --iw-samples > 1; with
--iw-max-examples N the IW bound is on the first N test images only, K=1 on all of them) with
its kind (exact, single-sample bound, estimated).  The evaluations run one after the other
after all training, outside the budget, with ``--eval-threads`` threads (default 2).
"""
import argparse
import json
import os
import shutil
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
    parser.add_argument("--iw-max-examples", type=int, help="IW bound on the first N test images only")
    parser.add_argument("--eval-threads", type=int, default=2, help="CPU threads of each (sequential) evaluation")
    args = parser.parse_args()
    eval_env = {**os.environ, "OMP_NUM_THREADS": str(args.eval_threads), "MKL_NUM_THREADS": str(args.eval_threads)}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs = [parse_run(spec) for spec in args.configs]
    names = [name for name, _, _ in runs]
    if len(set(names)) != len(names):
        parser.error(f"two runs would share a name: {names}")
    pending = list(runs)
    running = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, config, overrides = pending.pop(0)
            out = os.path.join(args.out, name)
            cmd = [sys.executable, "train.py", config, "--out", out, "train.steps=10000000",
                   f"train.time_limit_minutes={args.minutes}", *args.set, *overrides]
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
        iw_apart = args.iw_samples > 1 and args.iw_max_examples
        r, err = evaluate(out, js, eval_env, 1 if iw_apart else args.iw_samples)
        if r is not None and iw_apart:
            r_iw, iw_err = evaluate(out, os.path.join(out, "eval_iw.json"), eval_env, args.iw_samples, args.iw_max_examples)
            r["iw"] = r_iw["iw"] if r_iw is not None else {"error": iw_err}
        if r is None:
            rows.append(f"| {name} | failed: {err[:120]} | | | | | |")
            continue
        if r.get("iw") and "error" in r["iw"]:
            iw = f"failed: {r['iw']['error'][:120]}"
        else:
            iw = (f"{r['iw']['bpd']:.3f} ± {r['iw']['stderr']:.3f} (K={r['iw']['k']}, n={r['iw']['n']})"
                  if r.get("iw") else "–")
        rows.append(f"| {name} | {r['num_params']:,} | {r['step']:,} | {r['images_seen']:,} | "
                    f"{r['bpd']:.3f} ± {r['stderr']:.3f} (n={r['n']}) | {r['bound']} | {iw} |")
    print(f"\n{args.minutes:g} min each, {args.threads} thread(s) per run, {args.parallel} at a time\n")
    print("| config | params | steps | images seen | test bpd (K=1) | kind | test bpd (IW) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """``CONFIG.yaml[::key=value...]`` -> (run name, config path, overrides)."""
    config, *overrides = spec.split("::")
    name = os.path.splitext(os.path.basename(config))[0]
    for o in overrides:
        if "=" not in o:
            raise SystemExit(f"per-run override {o!r} in {spec!r} is not key=value")
        name += "_" + o.split("=", 1)[1].replace("/", "-").replace(" ", "")
    return name, config, overrides


def train_fresh(config: str, out: str, overrides: list[str], env: dict, log_path: str) -> tuple[int, float]:
    """``train.py CONFIG --out OUT OVERRIDES`` from a fresh ``out`` (removed first: the budget is the
    whole run), its output to ``log_path``: (exit code, wall seconds)."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, "train.py", config, "--out", out, *overrides], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    return code, time.time() - start


def evaluate(out: str, js: str, env: dict, iw_samples: int, max_examples: int | None = None):
    """Run eval.py on a run directory: (its JSON result, None) or (None, the error)."""
    cmd = [sys.executable, "eval.py", out, "--json", js, "--iw-samples", str(iw_samples)]
    if max_examples:
        cmd += ["--max-examples", str(max_examples)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr.strip()
    with open(os.path.join(ROOT, js)) as f:
        return json.load(f), None


if __name__ == "__main__":
    main()
