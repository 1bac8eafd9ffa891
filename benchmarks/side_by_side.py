"""Training and sampling throughput against the reference implementations, in modes of ours.

    python benchmarks/side_by_side.py --refs $REFS                                  # five families, fp32 and bf16
    python benchmarks/side_by_side.py --refs $REFS --families glow idf --modes fp32 bf16 channels_last --rounds 2
    (--refbench ../shared/refbench; --npz the data, default $CIFAR_NPZ else REFBENCH/../data/cifar10_subset.npz;
     --threads 2; --python: the harnesses' python (needs `six` for FFJORD); --out runs/side_by_side)

The runs of ``../shared/refbench/side_by_side.sh`` (the same harness commands and the same
``benchmarks/throughput.py`` runs of ours, paper configurations, batch 16, Flow++ also at 4), with
each of our runs repeated in every ``--modes`` entry: ``fp32`` (the config as it is), ``bf16``
(``train.mixed_precision=bf16``: autocast, conditioner networks in bf16, the invertible stream,
log-dets and bits/dim in float32), ``channels_last`` (``train.memory_format=channels_last``) and
``contiguous`` (``train.memory_format=contiguous``: the NCHW baseline of a config that sets channels_last,
e.g. resflow_cifar10.yaml).
Per round, each family's reference runs first, then ours in every mode, one process after the other
(``OMP_NUM_THREADS`` = ``--threads``); ratios are against the reference of the same round and the
table gives medians over ``--rounds``.  Sampling is timed in the mode's precision (``model.sample``, as sample.py).
JSON lines go to ``OUT/side_by_side.jsonl``; the table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.equal_budget import ROOT
from benchmarks.reference_race import FAMILIES
from common.errors import FlowlabError
from engine.cli import run_cli

MODES = {"fp32": [], "bf16": ["train.mixed_precision=bf16"], "channels_last": ["train.memory_format=channels_last"],
         "contiguous": ["train.memory_format=contiguous"]}
GLOW_REFERENCE_ARCH = ["model.permutation=conv1x1_lu", "model.edge_padding=false"]

# family -> [(harness arguments, [(our config, our overrides, throughput.py arguments), ...]), ...]:
# one entry per batch size, as side_by_side.sh runs them
RUNS = {
    "glow": [(["--batch", "16", "--warmup", "2", "--steps", "5"],
              [("experiments/glow_cifar10.yaml", ["train.batch_size=16"], ["--warmup", "2", "--steps", "5", "--sample-n", "16"]),
               ("experiments/glow_cifar10.yaml", ["train.batch_size=16", *GLOW_REFERENCE_ARCH],
                ["--warmup", "2", "--steps", "5", "--sample-n", "16"])])],
    "idf": [(["--batch", "16", "--warmup", "2", "--steps", "5"],
             [("experiments/idf_cifar10.yaml", ["train.batch_size=16"], ["--warmup", "2", "--steps", "5", "--sample-n", "16"])])],
    "ffjord": [(["--batch", "16", "--warmup", "1", "--steps", "1"],
                [("experiments/ffjord_cifar10.yaml", ["train.batch_size=16"], ["--warmup", "1", "--steps", "1", "--sample-n", "16"])])],
    "resflow": [(["--batch", "16", "--warmup", "1", "--steps", "1"],
                 [("experiments/resflow_cifar10.yaml", ["train.batch_size=16"], ["--warmup", "1", "--steps", "1", "--sample-n", "16"])])],
    "flowpp": [(["--batch", "4", "--warmup", "1", "--steps", "2"],
                [("experiments/flowpp_cifar10.yaml", ["train.batch_size=4"], ["--warmup", "1", "--steps", "2", "--sample-n", "4"])]),
               (None, [("experiments/flowpp_cifar10.yaml", ["train.batch_size=16"], ["--warmup", "1", "--steps", "1", "--sample-n", "16"])])],
}


def run_reference(family: str, harness_args: list[str], args, env: dict, log_path: str) -> dict:
    fam = FAMILIES[family]
    out_json = os.path.abspath(os.path.join(args.out, "ref.json"))
    if os.path.exists(out_json):
        os.remove(out_json)  # the harness appends
    cmd = [args.python, fam["harness"], "--config", "paper", *harness_args, "--threads", str(args.threads), "--out", out_json]
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=args.refbench, env={**env, "REF_DIR": os.path.join(args.refs, fam["ref_dir"])},
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not os.path.exists(out_json):
        return {"failed": f"harness exit {code} (log: {log_path})"}
    with open(out_json) as f:
        r = json.loads(f.readlines()[-1])
    return {"img_per_s": r["img_per_sec"], "sample_s": r.get("sample_sec"), "peak_mb": r["peak_rss_mb"]}


def run_ours(config: str, overrides: list[str], bench_args: list[str], args, env: dict, log_path: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), config, "data.name=npz",
           f"data.path={args.npz}", "train.init_batch_size=16", *overrides, *bench_args]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"failed": f"throughput.py exit {proc.returncode} (log: {log_path})"}
    r = json.loads(lines[-1])
    return {"img_per_s": r["train_img_per_s"], "sample_s": r["sample_seconds"], "peak_mb": r["peak_memory_mb"]}


def sweep(args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "CIFAR_NPZ": args.npz}
    rows, jsonl = [], os.path.join(args.out, "side_by_side.jsonl")
    for round_ in range(1, args.rounds + 1):
        for family in args.families:
            for harness_args, ours in RUNS[family]:
                batch = int(ours[0][1][0].split("=")[1])
                runs = []
                if harness_args is not None:
                    runs.append(("reference", "paper config", "-", lambda: run_reference(
                        family, harness_args, args, env, os.path.join(args.out, f"ref.{family}.log"))))
                for config, overrides, bench_args in ours:
                    what = " ".join(o for o in overrides if o.startswith("model.")) or "paper config"
                    for mode in args.modes:
                        runs.append(("flowlab", what, mode, lambda c=config, o=overrides + MODES[mode], b=bench_args:
                                     run_ours(c, o, b, args, env, os.path.join(args.out, f"ours.{family}.log"))))
                for who, what, mode, run in runs:
                    start = time.time()
                    row = {"round": round_, "family": family, "batch": batch, "who": who, "config": what, "mode": mode,
                           **run()}
                    print(f"round {round_} {family} batch {batch} {who} {what} {mode}: "
                          f"{row.get('failed') or row['img_per_s']} ({time.time() - start:.0f} s)", flush=True)
                    rows.append(row)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    """Medians over rounds; ratios against the reference of the same family, batch and round."""
    refs = {(r["round"], r["family"], r["batch"]): r for r in rows if r["who"] == "reference" and "failed" not in r}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["batch"], r["who"], r["config"], r["mode"]), []).append(r)
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = ["| family | batch | who | config | mode | runs | img/s | training ratio | sample s | sampling ratio | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (family, batch, who, config, mode), rs in groups.items():
        ok = [r for r in rs if "failed" not in r]
        if not ok:
            lines.append(f"| {family} | {batch} | {who} | {config} | {mode} | 0 | failed: {rs[-1]['failed'][:120]} | | | | |")
            continue
        pairs = [(r, refs.get((r["round"], family, batch))) for r in ok]
        train_ratio = med([r["img_per_s"] / ref["img_per_s"] for r, ref in pairs if ref and who == "flowlab"])
        sample_ratio = med([ref["sample_s"] / r["sample_s"] for r, ref in pairs
                            if ref and who == "flowlab" and ref.get("sample_s") and r.get("sample_s")])
        lines.append(f"| {family} | {batch} | {who} | {config} | {mode} | {len(ok)} | {fmt(med([r['img_per_s'] for r in ok]))} | "
                     f"{fmt(train_ratio, '{:.2f}x')} | {fmt(med([r['sample_s'] for r in ok if r.get('sample_s')]), '{:.2f}')} | "
                     f"{fmt(sample_ratio, '{:.2f}x')} | {fmt(max(r['peak_mb'] for r in ok), '{:,.0f}')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=list(MODES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--refbench", default=os.environ.get("REFBENCH", os.path.join(ROOT, "..", "shared", "refbench")))
    parser.add_argument("--refs", default=os.environ.get("REFS"), help="folder of the unpacked references ($REFS)")
    parser.add_argument("--npz", default=os.environ.get("CIFAR_NPZ"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--python", default=sys.executable, help="python of the harnesses (needs `six` for FFJORD)")
    parser.add_argument("--out", default="runs/side_by_side")
    args = parser.parse_args()
    if not args.refs or not os.path.isdir(args.refs):
        raise FlowlabError("--refs (or $REFS) must name the folder of the unpacked references (../shared/refbench/README.md)")
    if not os.path.isfile(os.path.join(args.refbench, "_common.py")):
        raise FlowlabError(f"--refbench {args.refbench}: no refbench harnesses there")
    args.npz = os.path.abspath(args.npz or os.path.join(args.refbench, "..", "data", "cifar10_subset.npz"))
    if not os.path.isfile(args.npz):
        raise FlowlabError(f"no data file {args.npz} (--npz)")
    if args.rounds < 1:
        raise FlowlabError("--rounds must be >= 1")
    args.refs, args.refbench = os.path.abspath(args.refs), os.path.abspath(args.refbench)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    rows = sweep(args)
    print(table(rows))


if __name__ == "__main__":
    run_cli(main)
