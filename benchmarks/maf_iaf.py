"""MAF vs IAF: density (log_prob) and sampling time as the dimension D grows.

Both flows are the ``vector_flow`` family (``models.builders.vector_layers``) with
``model.flow=maf`` and ``model.flow=iaf`` and otherwise the same ``model`` keys: the same
number of layers (``model.steps``) of the same MADE (``model.hidden_blocks`` hidden layers
``model.hidden_channels`` wide), given as dotted overrides as for train.py.  MAF scores
data in one MADE pass per layer and samples in D passes; IAF samples in one pass and
scores *new* data in D passes (its density direction has to recover the latent coordinate
by coordinate).  Prints a markdown table of milliseconds
per batch and the MADE passes each direction needs.

    python benchmarks/maf_iaf.py                       # D in 2 8 32 128 512, batch 64, 2 layers of 128 x 2
    python benchmarks/maf_iaf.py --dims 2 8 32 --batch 64 --repeats 3 model.steps=4 model.hidden_channels=64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


from common.errors import FlowlabError
from engine.cli import run_cli
from engine.config import apply_overrides, resolve
from models.architectures import build_model
from models.core.flow import Flow

MODEL = {"name": "vector_flow", "steps": 2, "hidden_channels": 128, "hidden_blocks": 2}  # the benchmark's defaults


def model_section(overrides: list[str]) -> dict:
    """The resolved ``model`` section of the vector_flow family with ``model.*`` overrides."""
    if any(not o.startswith("model.") for o in overrides):
        raise FlowlabError(f"maf_iaf.py takes model.* overrides only, got {overrides}")
    return resolve(apply_overrides({"model": dict(MODEL)}, overrides))["model"]


def build(kind: str, dim: int, layers: int | None = None, hidden: int | None = None, model: dict | None = None) -> Flow:
    """The vector_flow of ``model`` (default: the benchmark's) as ``kind`` (maf | iaf) on D = ``dim``;
    ``layers`` / ``hidden`` set ``model.steps`` / ``model.hidden_channels``."""
    cfg = dict(model or model_section([]))
    cfg.update(flow=kind, **({"steps": layers} if layers is not None else {}),
               **({"hidden_channels": hidden} if hidden is not None else {}))
    return build_model(cfg, (dim,), None, {"kind": "none"})


@torch.no_grad()
def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128, 512])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="model.* overrides, e.g. model.steps=4 model.hidden_channels=64")
    args = ap.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = model_section(args.overrides)
    layers, hidden = model["steps"], f"{model['hidden_channels']}x{model['hidden_blocks']}"
    rows = []
    for d in args.dims:
        maf, iaf = build("maf", d, model=model).eval(), build("iaf", d, model=model).eval()
        x = torch.randn(args.batch, d)
        r = {
            "maf_density": timed(lambda: maf.log_prob(x), args.repeats),
            "maf_sample": timed(lambda: maf.sample(args.batch), args.repeats),
            "iaf_density": timed(lambda: iaf.log_prob(x), args.repeats),
            "iaf_sample": timed(lambda: iaf.sample(args.batch), args.repeats),
        }
        rows.append((d, r))
        print(f"D={d}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r.items()), file=sys.stderr, flush=True)
    print(f"MAF vs IAF, {layers} layers, MADE hidden {hidden}, batch {args.batch}, "
          f"{args.threads} thread(s), best of {args.repeats} (ms per batch)")
    print()
    print("| D | MAF density (1 pass/layer) | MAF sampling (D passes/layer) | IAF density (D passes/layer) "
          "| IAF sampling (1 pass/layer) | MAF sample / density | IAF density / sample |")
    print("|---|---|---|---|---|---|---|")
    for d, r in rows:
        print(f"| {d} | {r['maf_density']:.2f} | {r['maf_sample']:.2f} | {r['iaf_density']:.2f} | {r['iaf_sample']:.2f} "
              f"| {r['maf_sample'] / r['maf_density']:.0f}x | {r['iaf_density'] / r['iaf_sample']:.0f}x |")
    return rows


if __name__ == "__main__":
    run_cli(main)
