"""Peak memory of one Residual-Flow training step vs the number of power-series terms,
for the three gradient modes of ``InvertibleResidualBlock``; prints one JSON line per run.

    python benchmarks/resflow_memory.py [--blocks 4] [--hidden 128] [--batch 16] [--terms 2 8 16]

Each (mode, terms) runs in a fresh subprocess: a stack of ``--blocks`` conv residual blocks on
3x32x32 inputs with the truncated estimator (exactly ``terms`` terms, so runs are comparable),
one forward + backward of the mean log-det.  Modes:
    series       backprop through every term (i-ResNet): memory grows with the terms
    neumann      Neumann-series gradient, graph of the surrogate kept until backward
    mem_eff      Neumann gradient computed in the forward pass (Residual Flows default)
Memory: CUDA -> max_memory_allocated; CPU -> peak RSS minus the RSS before the step.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, ROOT)
MODES = {"series": (False, False), "neumann": (True, False), "mem_eff": (True, True)}


def child(mode: str, terms: int, blocks: int, hidden: int, batch: int) -> dict:
    import time

    import torch

    from models.core.compose import Compose
    from models.nets.resflow_nets import ConvResidualNet
    from models.transforms.residual.iresblock import InvertibleResidualBlock

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    neumann, mem = MODES[mode]
    layers = [InvertibleResidualBlock(ConvResidualNet((3, 32, 32), hidden, preact=i > 0), estimator="truncated",
                                      n_terms=terms, neumann_grad=neumann, mem_efficient=mem) for i in range(blocks)]
    model = Compose(layers).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # RSS now (Linux)
    start = time.perf_counter()
    z, total = model(x)
    loss = -(total.mean() - 0.5 * (z ** 2).flatten(1).sum(1).mean())
    loss.backward()
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
        kind = "cuda_max_memory_allocated_minus_before"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        kind = "cpu_peak_rss_minus_rss_before_step"
    return {"mode": mode, "terms": terms, "blocks": blocks, "hidden": hidden, "batch": batch, "device": str(dev),
            "step_peak_mb": round(peak / 2**20, 1), "memory_kind": kind, "seconds": round(seconds, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--terms", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TERMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.blocks, args.hidden, args.batch)), flush=True)
        return
    for mode in args.modes:
        for terms in args.terms:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(terms), "--blocks", str(args.blocks),
                   "--hidden", str(args.hidden), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
