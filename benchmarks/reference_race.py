"""Equal wall-clock learning against the reference implementations (issue 14, item 4): for each
family, the reference's small configuration through its refbench harness, then ours at the
reference's small architecture with the reference's recipe and with our own, one run after the
other, each for the same S seconds from scratch; then test bits/dim on the same first N test images.

    python benchmarks/reference_race.py --refbench ../shared/refbench --refs $REFS          # all five, 120 s each
    python benchmarks/reference_race.py --families flowpp idf --budget 120 --refs $REFS
    python benchmarks/reference_race.py --families idf --budget 5 --refs $REFS              # that it runs end to end
    python benchmarks/reference_race.py --families glow idf --bf16 --refs $REFS             # + both recipes in bf16
    (--npz: the data of both sides, default $CIFAR_NPZ else REFBENCH/../data/cifar10_subset.npz;
     --threads 2 (OMP/MKL threads and the harness's --threads); --out runs/reference_race)

Per family: ``ref_<x>.py --config small --batch 64 --warmup 0 --steps 1 --budget S --eval-n N``,
``train.py <our small config> --out OUT/<family>_ref_recipe ARCH REF_RECIPE`` and ``... _our_recipe
ARCH`` (batch 64, ``train.time_limit_minutes=S/60``, ``eval.max_examples=N``), then ``eval.py``;
one markdown table: family, run, params, steps in S s, test bpd (± s.e. for ours), what it is.
N is the harness's default 1017 (the whole test split), 128 for Residual Flows and 64 for FFJORD.

ARCH are the overrides that build the reference's small architecture; ``PARAMS`` holds both
parameter counts (the references' counted by instantiating their models; tests/test_reference_race.py
checks ours) and, where they differ, why.  Our recipe is the small config's own training settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.equal_budget import ROOT, evaluate, train_fresh
from common.errors import FlowlabError
from engine.cli import run_cli

# family -> what the race runs.  "arch": our config keys at the reference's small architecture
# (the harness docstring's 'small'); "ref_recipe": the reference's optimizer, clipping, no warm-up,
# no flips (the harnesses augment nothing), and what else it trains with; "eval_n": test images.
FAMILIES = {
    "glow": {
        "config": "experiments/glow_small.yaml", "harness": "ref_glow.py", "ref_dir": "glow-pytorch", "eval_n": 1017,
        "arch": ["model.levels=3", "model.steps=8", "model.hidden_channels=128", "model.coupling=affine",
                 "model.permutation=conv1x1_lu", "model.edge_padding=false"],
        "ref_recipe": ["train.lr=1e-4", "train.warmup_steps=0", "train.grad_clip=0", "data.hflip=false"],
        "ref_kind": "single-sample (K=1)",   # uniform dequantization
    },
    "flowpp": {
        "config": "experiments/flowpp_small.yaml", "harness": "ref_flowpp.py", "ref_dir": "flowplusplus",
        "eval_n": 1017,
        # scales (0,4),(2,3); 32 channels, 2 blocks, 8 logistics, no attention; the dequantizer as the
        # reference builds it whatever the model's knobs: 4 steps of 1 block, 32 logistics, context 32 + 3 blocks
        "arch": ["model.steps=[4,2,3]", "model.hidden_channels=32", "model.hidden_blocks=2", "model.components=8",
                 "model.attention=false", "dequantizer.kind=variational", "dequantizer.steps=4",
                 "dequantizer.hidden_channels=32", "dequantizer.hidden_blocks=1", "dequantizer.components=32",
                 "dequantizer.attention=false", "dequantizer.context_channels=32", "dequantizer.context_blocks=3"],
        # Adam 1e-3, clip 1.0 (the reference clips each of its 2 parameter groups), dropout 0.2; its weight
        # decay 5e-5 is on weight-norm gains only, which ours does not have: none here
        "ref_recipe": ["train.lr=1e-3", "train.betas=[0.9,0.999]", "train.warmup_steps=0", "train.grad_clip=1.0",
                       "train.ema=0", "model.dropout=0.2", "dequantizer.dropout=0.2", "data.hflip=false"],
        "ref_kind": "single-sample (K=1)",   # variational dequantization
    },
    "idf": {
        "config": "experiments/idf_small.yaml", "harness": "ref_idf.py", "ref_dir": "integer_discrete_flows",
        "eval_n": 1017,
        "arch": ["model.levels=3", "model.steps=4", "model.hidden_channels=128", "model.hidden_blocks=4",
                 "model.coupling_split=quarter", "model.prior_mixtures=5", "model.split_prior_mixtures=1"],
        "ref_recipe": ["train.optimizer=adamax", "train.lr=1e-3", "train.eps=1e-7", "train.warmup_steps=0",
                       "train.schedule=constant", "train.grad_clip=0", "data.hflip=false"],
        "ref_kind": "exact",
    },
    "resflow": {
        "config": "experiments/resflow_small.yaml", "harness": "ref_resflow.py", "ref_dir": "residual-flows",
        "eval_n": 128,
        # 4-4-4 blocks of 128, 4 FC blocks of 128; the rest of resflow_small is the official estimator
        "arch": ["model.steps=[4,4,4]", "model.hidden_channels=128", "model.fc_steps=4",
                 "model.fc_hidden_channels=128", "model.n_exact_terms_eval=20"],
        # the reference keeps an EMA (0.999) but evaluates the raw weights: no EMA here (it does not
        # change training, only what eval.py would score)
        "ref_recipe": ["train.lr=1e-3", "train.betas=[0.9,0.99]", "train.warmup_steps=0", "train.grad_clip=1.0",
                       "train.ema=0", "data.hflip=false"],
        "ref_kind": "single-sample (K=1)", "logdet": "roulette",   # uniform dequantization; estimated log-det
    },
    "ffjord": {
        "config": "experiments/ffjord_small.yaml", "harness": "ref_ffjord.py", "ref_dir": "ffjord", "eval_n": 64,
        # ODENVP of 4 scales, 1 block per stage, 32-32 concat softplus nets, learnable T, logit alpha 1e-6;
        # both sides evaluate with dopri5 at 1e-5 (the reference's test solver is its training solver)
        "arch": ["model.levels=4", "model.steps=1", "model.hidden_channels=[32,32]", "model.layer_type=concat",
                 "model.nonlinearity=softplus", "model.train_end_time=true", "model.logit_alpha=1e-6",
                 "model.test_solver=dopri5", "model.test_atol=1e-5", "model.test_rtol=1e-5"],
        # Adam 1e-3, no clipping (max norm 1e10), and its solver: dopri5 1e-5 with the adjoint, default init
        "ref_recipe": ["train.lr=1e-3", "train.warmup_steps=0", "train.grad_clip=0", "data.hflip=false",
                       "model.solver=dopri5", "model.atol=1e-5", "model.rtol=1e-5", "model.adjoint=true",
                       "model.zero_last=false"],
        "ref_kind": "single-sample (K=1)", "logdet": "Hutchinson",  # uniform dequantization; estimated trace
    },
}

# Parameters of the reference's small model (instantiated from its repository at the refbench commit,
# as the harness builds it) and of ours with ARCH; "why" explains a difference.
PARAMS = {
    "glow": {"reference": 1_657_296, "ours": 1_704_912,
             "why": "+41,472: our learned top prior is a zero-init 3x3 conv on 2C = 96 channels (openai/glow's "
                    "h_top), the reference's on C = 48; +6,144: our coupling nets' two hidden convs carry ActNorm "
                    "(scale + bias, openai/glow) where the reference's carry a bias: 24 couplings x 2 x 128"},
    "flowpp": {"reference": 1_207_832, "ours": 1_845_584,
               "why": "ours is the paper's code (aravindsrinivas/flowpp), the reference a re-implementation: "
                      "+275,904 our attention-free blocks keep a gated NIN sub-block with learned positional "
                      "embeddings (the paper's ablation), the reference drops the sub-block; +79,680 per-element "
                      "ActNorm (the paper's) against per-channel; +282,168 mostly the second scale, where ours "
                      "couples all 12 channels after the squeeze and the reference factors out 6 first (less its "
                      "5,152 weight-norm gains and 48 rescale weights)"},
    "idf": {"reference": 1_596_596, "ours": 1_596_596, "why": ""},
    "resflow": {"reference": 4_030_281, "ours": 4_030_249,
                "why": "the reference also registers 2 roulette settings (lamb, geom_p) as untrained parameters "
                       "in each of its 16 blocks (as resflow_cifar10.yaml)"},
    "ffjord": {"reference": 144_593, "ours": 144_593, "why": ""},
}

KIND_TEXT = {"single-sample (K=1)": "bound (single sample)", "estimated": "estimate", "exact": "exact"}


def kind(family: str, bound: str) -> str:
    """What a test bpd of ``family`` is: eval.py's bound name in words, and an estimated log-det."""
    logdet = FAMILIES[family].get("logdet")
    return KIND_TEXT.get(bound, bound) + (f", {logdet} log-det" if logdet else "")


def common_overrides(family: str, npz: str, budget: float) -> list[str]:
    """What both of our runs of ``family`` share: the data, batch 64, the budget, the test images."""
    return ["data.name=npz", f"data.path={npz}", "train.batch_size=64", "train.init_batch_size=64",
            "train.steps=1000000", f"train.time_limit_minutes={budget / 60}", "train.eval_every=0",
            "train.sample_every=0", "train.log_every=20", f"eval.max_examples={FAMILIES[family]['eval_n']}",
            *FAMILIES[family]["arch"]]


def recipes(family: str, bf16: bool = False) -> dict[str, list[str]]:
    """Run name suffix -> the overrides on top of the common ones; with ``bf16`` also both recipes
    under ``train.mixed_precision=bf16`` (whether bf16 learns as much per second as float32)."""
    runs = {"ref_recipe": FAMILIES[family]["ref_recipe"], "our_recipe": []}
    if bf16:
        runs.update({f"{name}_bf16": [*overrides, "train.mixed_precision=bf16"] for name, overrides in list(runs.items())})
    return runs


def run_reference(family: str, args, env: dict) -> tuple[dict | None, str | None]:
    """The reference's small config through its harness: (its JSON line, None) or (None, the error)."""
    fam = FAMILIES[family]
    out_json = os.path.abspath(os.path.join(args.out, f"{family}_reference.json"))
    if os.path.exists(out_json):
        os.remove(out_json)  # the harness appends
    cmd = [args.python, fam["harness"], "--config", "small", "--batch", "64", "--warmup", "0", "--steps", "1",
           "--budget", str(args.budget), "--eval-n", str(fam["eval_n"]), "--sample", "0", "--threads",
           str(args.threads), "--out", out_json]
    ref_env = {**env, "REF_DIR": os.path.join(args.refs, fam["ref_dir"]), "CIFAR_NPZ": args.npz}
    print(f"reference {family}: cd {args.refbench} && {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(os.path.join(args.out, f"{family}_reference.log"), "w") as log:
        code = subprocess.call(cmd, cwd=args.refbench, env=ref_env, stdout=log, stderr=subprocess.STDOUT)
    print(f"  exit {code} after {time.time() - start:.0f} s", flush=True)
    if code != 0 or not os.path.exists(out_json):
        return None, f"harness exit {code} (log: {log.name})"
    with open(out_json) as f:
        return json.loads(f.readlines()[-1]), None


def run_ours(family: str, recipe: str, args, env: dict) -> tuple[dict | None, str | None]:
    """Ours at the reference's architecture with one recipe, trained then evaluated."""
    fam, name = FAMILIES[family], f"{family}_{recipe}"
    out = os.path.join(args.out, name)
    overrides = [*common_overrides(family, args.npz, args.budget), *recipes(family, args.bf16)[recipe]]
    print(f"ours {name}: train.py {fam['config']} --out {out} {' '.join(overrides)}", flush=True)
    code, seconds = train_fresh(fam["config"], out, overrides, env, os.path.join(args.out, f"{name}.log"))
    print(f"  exit {code} after {seconds:.0f} s", flush=True)
    if code != 0:
        return None, f"train.py exit {code} (log: {os.path.join(args.out, name + '.log')})"
    # the same first eval_n test images as the harness (the run's eval.max_examples; said again explicitly)
    return evaluate(out, os.path.join(out, "eval.json"), env, 1, fam["eval_n"])


def table(results: list[tuple[str, str, dict | None, str | None]], budget: float) -> str:
    lines = [f"| family | run | params | steps in {budget:g} s | test bpd | kind (n) |", "|---|---|---|---|---|---|"]
    for family, run, r, err in results:
        if r is None:
            lines.append(f"| {family} | {run} | failed: {(err or '')[:150]} | | | |")
        elif run == "reference":
            lines.append(f"| {family} | {run} | {r['params']:,} | {r['train_steps']:,} | {r['test_bpd']:.3f} | "
                         f"{kind(family, FAMILIES[family]['ref_kind'])} ({r['test_n']}) |")
        else:
            lines.append(f"| {family} | {run.replace('_', ' ')} | {r['num_params']:,} | {r['step']:,} | "
                         f"{r['bpd']:.3f} ± {r['stderr']:.3f} | {kind(family, r['bound'])} ({r['n']}) |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds of every run")
    parser.add_argument("--refbench", default=os.environ.get("REFBENCH", os.path.join(ROOT, "..", "shared", "refbench")),
                        help="folder of the ref_*.py harnesses (default $REFBENCH, else ../shared/refbench)")
    parser.add_argument("--refs", default=os.environ.get("REFS"), help="folder of the unpacked references ($REFS)")
    parser.add_argument("--npz", default=os.environ.get("CIFAR_NPZ"),
                        help="the data of both sides (default $CIFAR_NPZ, else REFBENCH/../data/cifar10_subset.npz)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every run")
    parser.add_argument("--python", default=sys.executable, help="python of the harnesses (needs `six` for FFJORD)")
    parser.add_argument("--out", default="runs/reference_race")
    parser.add_argument("--bf16", action="store_true", help="also both of our recipes with train.mixed_precision=bf16")
    args = parser.parse_args()
    if args.budget <= 0 or args.threads < 1:
        raise FlowlabError("--budget must be > 0 and --threads >= 1")
    args.refbench, args.out = os.path.abspath(args.refbench), os.path.abspath(args.out)
    if not os.path.isfile(os.path.join(args.refbench, "_common.py")):
        raise FlowlabError(f"no refbench harnesses in {args.refbench}: pass --refbench (the folder of ref_*.py)")
    if not args.refs:
        raise FlowlabError("give --refs or $REFS: the folder of the unpacked references (see REFBENCH/README.md)")
    args.refs = os.path.abspath(args.refs)
    missing = [FAMILIES[f]["ref_dir"] for f in args.families if not os.path.isdir(os.path.join(args.refs, FAMILIES[f]["ref_dir"]))]
    if missing:
        raise FlowlabError(f"{args.refs} lacks {', '.join(missing)}: unpack them as REFBENCH/README.md says")
    args.npz = os.path.abspath(args.npz or os.path.join(args.refbench, "..", "data", "cifar10_subset.npz"))
    if not os.path.isfile(args.npz):
        raise FlowlabError(f"data file {args.npz} not found: pass --npz (the CIFAR-10 subset the harnesses read)")
    return args


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = []
    for family in args.families:
        r, err = run_reference(family, args, env)
        if r is not None and r["params"] != PARAMS[family]["reference"]:
            print(f"note: the reference {family} has {r['params']:,} parameters, PARAMS says "
                  f"{PARAMS[family]['reference']:,}", flush=True)
        results.append((family, "reference", r, err))
        for recipe in recipes(family, args.bf16):
            results.append((family, recipe, *run_ours(family, recipe, args, env)))
    print(f"\n{args.budget:g} s of training each from scratch, one run after the other, batch 64, "
          f"{args.threads} threads, data {args.npz}\n")
    print(table(results, args.budget))
    for family in args.families:
        p = PARAMS[family]
        if p["why"]:
            print(f"\n{family}: reference {p['reference']:,} parameters, ours {p['ours']:,}: {p['why']}")


if __name__ == "__main__":
    run_cli(main)
