"""Every paper config at its paper per-GPU batch in float32, bf16 and bf16 + train.compile; one
markdown table (family, params, mode, img/s, peak GB, sample seconds for 16 images, compile
seconds).  Sized for under 5 minutes on one H100-class GPU: few steps, the first (compiling)
step and the warm-up never timed (``benchmarks/throughput.py: measure``).

    python benchmarks/gpu_suite.py                       # the GPU suite (cuda when available)
    python benchmarks/gpu_suite.py --quick               # tiny configs on the CPU: that the suite runs
    python benchmarks/gpu_suite.py --explain             # graph breaks per family (tiny configs, CPU)
    python benchmarks/gpu_suite.py --configs glow_cifar10 resflow_cifar10 --modes fp32 bf16 --steps 5
    python benchmarks/gpu_suite.py --modes bf16 bf16+channels_last   # NHWC conditioners (train.memory_format)

Per-GPU batch: the config's ``train.batch_size`` (the global batch) divided by the GPUs of the
paper's run where the paper states it (``PAPER_GPUS``, from ../shared/papers.md: Glow 64 per
GPU x 8, Flow++ 8 x 8); the other papers state one batch and no split, which runs as is.
Data: random uint8 images of CIFAR-10's shape (speed does not depend on the pixels; the suite
runs offline).  A row that fails (out of memory, a compile error) prints its error in the
table and the suite goes on; ``--budget-s`` skips the rows left once the budget is spent.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
from accelerate.state import AcceleratorState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # --quick reads tests/test_contract.py's TINY configs: tests/ is not an installed package
    sys.path.insert(0, ROOT)

from benchmarks.throughput import RANDOM_SHAPES, measure  # noqa: E402
from common.errors import FlowlabError  # noqa: E402
from data import ImageDataset  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.config import apply_overrides, load_config, load_yaml, resolve  # noqa: E402
from engine.sections import RunConfig  # noqa: E402

# fastest first, the ODE families last: --budget-s cuts from the end
PAPER_CONFIGS = ["glow_cifar10", "flowpp_cifar10", "realnvp_cifar10", "idf_cifar10", "argmax_cifar10",
                 "resflow_cifar10", "iresnet_cifar10", "ffjord_cifar10", "rnode_cifar10"]
PAPER_GPUS = {"glow_cifar10": 8, "flowpp_cifar10": 8}  # global batch 512 = 64 x 8; 64 = 8 x 8
MODES = {"fp32": ["train.mixed_precision='no'"], "bf16": ["train.mixed_precision=bf16"],
         "bf16+compile": ["train.mixed_precision=bf16", "train.compile=default"],
         # NHWC conditioners (models/core/memory_format.py): cuDNN's tensor-core kernels want NHWC; not in the default set
         "bf16+channels_last": ["train.mixed_precision=bf16", "train.memory_format=channels_last"]}
DEFAULT_MODES = ["fp32", "bf16", "bf16+compile"]  # the 5-minute suite
QUICK_FAMILIES = ["glow", "idf"]  # --quick: tiny configs of tests/test_contract.py on 3x8x8 images
COLUMNS = ["family", "config", "params", "batch", "mode", "img/s", "peak GB", "sample 16 (s)", "compile (s)"]


def _random_data(cfg: RunConfig, n: int, quick: bool) -> ImageDataset:
    shape = (3, 8, 8) if quick else RANDOM_SHAPES.get(cfg.data.name, (3, 32, 32))
    x = torch.randint(0, 2 ** cfg.data.n_bits, (n, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageDataset(x, x[:16], cfg.data.n_bits, "random", f"random uint8 {shape} images")


def _tiny(family: str) -> dict:
    from tests.test_contract import TINY

    return apply_overrides({"model": {"name": family}}, TINY[family])


def rows_to_run(args) -> list[tuple[str, str, dict, list[str]]]:
    """(label, family, raw config, overrides) per config, before the modes."""
    if args.quick:
        return [(f"tiny {f}", f, _tiny(f), ["train.batch_size=4", "train.init_batch_size=8"])
                for f in args.families]
    out = []
    for name in args.configs:
        path = os.path.join(ROOT, "experiments", f"{name}.yaml")
        cfg = load_config(path)
        per_gpu = cfg["train"]["batch_size"] // PAPER_GPUS.get(name, 1)
        out.append((name, cfg["model"]["name"], load_yaml(path),
                    [f"train.batch_size={per_gpu}", "train.grad_accum_steps=1", "train.ema=0"]))
    return out


def row_config(raw: dict, overrides: list[str], mode: str, quick: bool = False) -> RunConfig:
    """The resolved config of one row: the config with the row's overrides and the mode's
    (``--quick``: Dynamo's tracing alone, backend eager, so the CPU test needs no C++ build)."""
    extra = MODES[mode] + (["train.compile_backend=eager"] if quick and "compile" in mode else [])
    return RunConfig.from_resolved(resolve(apply_overrides(raw, overrides + extra)))


def run_suite(args) -> list[dict]:
    """One row per (config, mode); the modes without compilation run first for every config, so a
    spent --budget-s skips compiled rows before any other (rows are returned in table order)."""
    rows, started = [], time.perf_counter()
    runs = rows_to_run(args)
    order = sorted(args.modes, key=lambda m: "compile" in m)
    for mode in order:
        for label, family, raw, overrides in runs:
            row = {"family": family, "config": label, "mode": mode}
            if time.perf_counter() - started > args.budget_s:
                rows.append({**row, "error": "skipped: --budget-s spent"})
                continue
            try:
                AcceleratorState._reset_state(reset_partial_state=True)  # each row its own mixed precision
                cfg = row_config(raw, overrides, mode, args.quick)
                data = _random_data(cfg, max(cfg.train.batch_size, min(cfg.train.init_batch_size, 256)), args.quick)
                r = measure(cfg, data, args.steps, args.warmup, args.sample_n)
                rows.append({**row, "params": r["params"], "batch": cfg.train.batch_size, "img/s": r["train_img_per_s"],
                             "peak GB": round(r["peak_memory_mb"] / 1024, 2), "sample 16 (s)": r["sample_seconds"],
                             "compile (s)": r["compile_seconds"] if r["compile_fallback"] is None else "eager",
                             "memory": r["memory_kind"], "device": r["device"]})
            except (RuntimeError, FlowlabError, AssertionError) as err:  # out of memory, a compile error
                rows.append({**row, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"})
            finally:
                gc.collect()
                torch._dynamo.reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(f"# {label} {mode}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    labels = [label for label, *_ in runs]
    return sorted(rows, key=lambda r: (labels.index(r["config"]), args.modes.index(r["mode"])))


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            cells = [r["family"], r["config"], "", "", r["mode"], r["error"], "", "", ""]
        else:
            cells = [r[c] if c != "params" else f"{r['params']:,}" for c in COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---- --explain: graph breaks per family ------------------------------------------------------

def explain_family(family: str) -> dict:
    """``torch._dynamo.explain`` of the training forward (train mode, the family's objective) of
    the tiny config: graphs, graph breaks and their reasons (deduplicated, with the line)."""
    from tests.test_contract import tiny_model

    torch.manual_seed(0)
    model, data = tiny_model(family, torch.device("cpu"))
    model.train()
    x = data.batch(4, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    out = torch._dynamo.explain(lambda batch: data.loss(model, batch)[0])(x)
    reasons = {}
    for br in out.break_reasons:
        frame = br.user_stack[-1] if br.user_stack else None
        where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}" if frame else "?"
        if where.startswith(".."):
            where = where.split("site-packages/")[-1]
        reason = " ".join(str(br.reason).split())[:140]
        reasons[(where, reason)] = reasons.get((where, reason), 0) + 1
    return {"family": family, "graphs": out.graph_count, "breaks": out.graph_break_count, "reasons": reasons}


def explain_all() -> None:
    from tests.test_contract import TINY

    print("| family | graphs | graph breaks | where (times): reason |\n|---|---|---|---|")
    for family in TINY:
        try:
            r = explain_family(family)
        except Exception as err:  # a family Dynamo cannot even explain: say so and go on
            print(f"| {family} | – | – | explain failed: {type(err).__name__}: {' '.join(str(err).split())[:120]} |")
            continue
        text = "; ".join(f"`{w}` ({n}): {reason}" for (w, reason), n in sorted(r["reasons"].items())) or "none"
        print(f"| {family} | {r['graphs']} | {r['breaks']} | {text} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs (tests/test_contract.py TINY) on the CPU")
    parser.add_argument("--families", nargs="+", default=QUICK_FAMILIES, help="--quick: the tiny families to run")
    parser.add_argument("--explain", action="store_true", help="print the graph breaks per family and exit")
    parser.add_argument("--configs", nargs="+", default=PAPER_CONFIGS, help="experiments/<name>.yaml")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default 1)")
    parser.add_argument("--sample-n", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip the rows left after this many seconds")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.sample_n < 1 or args.budget_s <= 0:
        raise FlowlabError("--steps and --sample-n must be >= 1, --warmup >= 0 and --budget-s > 0")
    unknown = [c for c in args.configs if not os.path.isfile(os.path.join(ROOT, "experiments", f"{c}.yaml"))]
    if unknown:
        raise FlowlabError(f"no experiments/<name>.yaml for {unknown}")
    if args.explain:
        explain_all()
        return
    if args.quick:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    start = time.perf_counter()
    rows = run_suite(args)
    device = next((r["device"] for r in rows if "device" in r), "none")
    print(f"GPU suite on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, {args.steps} timed steps after {1 + args.warmup} untimed, "
          f"{time.perf_counter() - start:.0f} s in all; peak memory: "
          f"{'torch.cuda.max_memory_allocated per row' if device.startswith('cuda') else 'peak RSS of the process so far'}")
    print(markdown(rows))


if __name__ == "__main__":
    run_cli(main)
