"""MAF vs IAF: density (log_prob) and sampling time as the dimension D grows.

Both flows use the same MADE network (hidden layers ``--hidden`` wide) and the same
number of layers.  MAF scores data in one MADE pass per layer and samples in D passes;
IAF samples in one pass and scores *new* data in D passes (its density direction has to
recover the latent coordinate by coordinate).  Prints a markdown table of milliseconds
per batch and the MADE passes each direction needs.

    python benchmarks/maf_iaf.py                       # D in 2 8 32 128 512, batch 64
    python benchmarks/maf_iaf.py --dims 2 8 32 --batch 64 --repeats 3
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


from models.core.distributions import StandardNormal
from models.core.flow import Flow
from models.nets.made import MADE
from models.transforms.vector.iaf import IAF
from models.transforms.vector.maf import MAF


def build(kind: str, dim: int, layers: int, hidden: int) -> Flow:
    cls = MAF if kind == "maf" else IAF
    ts = [cls(MADE(dim, (hidden, hidden), ordering="natural" if i % 2 == 0 else "reverse")) for i in range(layers)]
    return Flow(ts, StandardNormal((dim,)), (dim,))


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
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for d in args.dims:
        maf, iaf = build("maf", d, args.layers, args.hidden).eval(), build("iaf", d, args.layers, args.hidden).eval()
        x = torch.randn(args.batch, d)
        r = {
            "maf_density": timed(lambda: maf.log_prob(x), args.repeats),
            "maf_sample": timed(lambda: maf.sample(args.batch), args.repeats),
            "iaf_density": timed(lambda: iaf.log_prob(x), args.repeats),
            "iaf_sample": timed(lambda: iaf.sample(args.batch), args.repeats),
        }
        rows.append((d, r))
        print(f"D={d}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r.items()), file=sys.stderr, flush=True)
    print(f"MAF vs IAF, {args.layers} layers, MADE hidden {args.hidden}x2, batch {args.batch}, "
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
    main()
