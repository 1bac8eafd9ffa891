"""The same one-step profile as ``benchmarks/profile_step.py``, of a reference implementation.

    python benchmarks/profile_reference.py idf --refbench ../shared/refbench --refs $REFS \
        [--config paper] [--batch 16] [--warmup 1] [--top 15] [--json out.json]

Runs the family's refbench harness (``REFBENCH/ref_<family>.py``, which builds the reference's
model, optimizer and ``train_step`` from its checkout ``REFS/<repo>``) in this process, with the
harness's timing loop replaced: ``--warmup`` untimed ``train_step`` calls on its own batches, then
one profiled call summarised by ``profile_step.summarize``: top operators, the kernel floor
(convolution and matmul kernels as a share of the step), casts, copies and host reads.  So the two
codes' steps are measured the same way, and a step "within 10% of its floor" means the same on
both sides.  The harness and the reference are run, never copied here.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.profile_step import print_report, profile_callable
from benchmarks.reference_race import FAMILIES
from common.errors import FlowlabError
from engine.cli import run_cli


def profiled_run(common, warmup: int, top: int, results: list):
    """A stand-in for the harness's ``_common.run``: warm up, then profile one training step."""
    def run(name, args, model, train_step, eval_bpd=None, sample=None, info=None):
        train, _ = common.load_data()
        batches = common.batches(train, args.batch, args.seed)
        for _ in range(warmup):
            train_step(next(batches))
        x = next(batches)
        results.append((name, profile_callable(lambda: train_step(x), torch.device("cpu"), top)))
    return run


def run_harness(family: str, refbench: str, refs: str, config: str, batch: int, threads: int, stand_in) -> None:
    """Run ``family``'s refbench harness in this process with its timing loop ``_common.run``
    replaced by ``stand_in(_common)`` (called as the harness calls ``run``: name, args, model,
    train_step, eval_bpd, sample, info).  Missing folders are ``FlowlabError``s."""
    spec = FAMILIES[family]
    harness = os.path.join(os.path.abspath(refbench), spec["harness"])
    ref_dir = os.path.join(os.path.abspath(refs), spec["ref_dir"])
    for path, what in ((harness, "refbench harness"), (ref_dir, "reference checkout")):
        if not os.path.exists(path):
            raise FlowlabError(f"{what} not found: {path}")
    sys.path.insert(0, os.path.dirname(harness))
    import _common  # the harness's helpers (on the path just above)

    # the reference's top-level packages may share names with ours (IDF's ``models``): ours,
    # already imported for the profiler helpers, leave sys.modules so the harness imports its own
    own = {n[:-3] if n.endswith(".py") else n for n in os.listdir(ref_dir)}
    for key in [k for k in sys.modules if k.split(".")[0] in own]:
        del sys.modules[key]
    _common.run = stand_in(_common)
    sys.argv = [harness, "--ref-dir", ref_dir, "--config", config, "--batch", str(batch), "--threads", str(threads)]
    runpy.run_path(harness, run_name="__main__")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--refbench", required=True, help="folder of the refbench harnesses (ref_<family>.py, _common.py)")
    parser.add_argument("--refs", required=True, help="folder holding the unpacked reference checkouts")
    parser.add_argument("--config", default="paper", choices=["paper", "small"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.warmup < 0 or args.top < 1 or args.batch < 1:
        raise FlowlabError("--warmup must be >= 0, --top and --batch >= 1")
    results: list = []
    run_harness(args.family, args.refbench, args.refs, args.config, args.batch, args.threads,
                lambda common: profiled_run(common, args.warmup, args.top, results))
    if not results:
        raise FlowlabError(f"{FAMILIES[args.family]['harness']} never reached its training loop")
    name, summary = results[0]
    print_report(f"{name} ({args.config} config, batch {args.batch})", summary, None)
    out = {"family": args.family, "reference": name, "config": args.config, "batch": args.batch, **summary}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
