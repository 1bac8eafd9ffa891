"""Test bits/dim of a run, or a markdown table of runs against their papers.

    python eval.py RUN_DIR [--split test] [--json out.json]
    python eval.py --table RUN_DIR [RUN_DIR ...]
    python eval.py RUN_DIR --iw-samples 4096 [--iw-chunk 64]
    python eval.py model.safetensors            # an exported (shared) model; or a checkpoint file (best.pt)

bits/dim is the mean over the whole split +- its standard error; the output says whether
each image's number is exact (IDF), an estimate (stochastic log-dets) or a bound.  For models with
stochastic (uniform or variational) dequantization it is the single-sample variational
bound (K=1); ``--iw-samples K`` adds the importance-weighted bound
log (1/K) sum_k p(x + u_k) / q(u_k | x) (Flow++'s evaluation), computed ``--iw-chunk``
samples per forward so that K=4096 fits in memory.  K is stated next to every number.

A run of another objective (``objective.name``: nll, elbo, reverse_kl) is evaluated as its
trainer evaluates it (``objective.evaluate``: test NLL in nats; -ELBO and the importance-sampled
-log p(x), ``--iw-samples`` replacing ``eval.iw_samples``; the reverse KL on fresh samples).
"""
import dataclasses
import argparse
import json
import math
import os

import torch

from engine.cli import check_at_least, check_device, check_output_file, run_cli
from common.errors import FlowlabError
from engine.evaluate import evaluate_bpd
from engine.run import load_run
from engine.setup import load_data, make_objective


def evaluate_run(run_dir: str, split: str, batch_size: int | None, device: str, use_ema: bool = True,
                 iw_samples: int = 1, iw_chunk: int | None = None, max_examples: int | None = None) -> dict:
    cfg, model, info = load_run(run_dir, use_ema=use_ema, device=device)
    data = load_data(cfg)
    if cfg.objective["name"] != "bpd":
        return _evaluate_objective(run_dir, cfg, model, info, data, split, batch_size, iw_samples, max_examples)
    images = {"test": data.test, "train": data.train}[split]
    if max_examples:
        images = images[:max_examples]
    if images.shape[0] == 0:
        raise FlowlabError(f"the {split} split of {data.source} holds no images: nothing to evaluate")
    if tuple(images.shape[1:]) != tuple(model.data_shape):
        raise FlowlabError(f"data shape {tuple(images.shape[1:])} does not match the model's {model.data_shape}")
    batch_size = batch_size or cfg.eval.batch_size
    result = evaluate_bpd(model, images, batch_size, seed=cfg.train.seed)
    _check_finite_result(result, run_dir, split)
    iw = None
    if iw_samples > 1 and model.is_stochastic:
        r = evaluate_bpd(model, images, batch_size, seed=cfg.train.seed + 1, iw_samples=iw_samples, iw_chunk=iw_chunk)
        _check_finite_result(r, run_dir, split)
        iw = {"bpd": r["bpd"], "stderr": r["stderr"], "n": r["n"], "nonfinite": r["nonfinite"], "k": iw_samples,
              "bound": f"importance-weighted (K={iw_samples})"}
    return {"run": run_dir, "model": cfg.model["name"], "split": split, **result, "bound": bound_kind(model),
            "stochastic": model.is_stochastic, "iw": iw,
            "step": info["step"], "images_seen": info["images_seen"], "ema": info["ema"],
            "num_params": sum(p.numel() for p in model.parameters()), "data": data.source, "paper": cfg.paper.to_dict()}


def _check_finite_result(result: dict, run_dir: str, split: str) -> None:
    """A non-finite bits/dim is an error, not a number to report."""
    if not math.isfinite(result["bpd"]):
        raise FlowlabError(f"{run_dir}: {result['nonfinite']} of {result['n']} {split} images get a non-finite "
                           f"bits/dim, so there is no {split} bpd to report")


def _evaluate_objective(run_dir, cfg, model, info, data, split, batch_size, iw_samples, max_examples) -> dict:
    """A run whose objective is not bits/dim: the objective's own test numbers on ``split``."""
    if data.test is not None:
        data = dataclasses.replace(data, test={"test": data.test, "train": data.train}[split])
    eval_cfg = dataclasses.replace(cfg.eval, batch_size=batch_size or cfg.eval.batch_size,
                                   max_examples=max_examples or cfg.eval.max_examples,
                                   iw_samples=iw_samples if iw_samples > 1 else cfg.eval.iw_samples)
    result = make_objective(cfg).evaluate(model, data, eval_cfg, seed=cfg.train.seed)
    return {"run": run_dir, "model": cfg.model["name"], "objective": cfg.objective["name"], "split": split,
            **{k: v for k, v in result.items() if k != "line"}, "line": result["line"], "step": info["step"],
            "images_seen": info["images_seen"], "ema": info["ema"],
            "num_params": sum(p.numel() for p in model.parameters()), "data": data.source, "paper": cfg.paper.to_dict()}


def bound_kind(model) -> str:
    """What the per-image number is (``Flow.likelihood_kind``): a single-sample variational
    bound (a layer draws noise: dequantization, argmax), an estimate of log p (a log-det is
    estimated: Russian roulette, Hutchinson's trace) or the exact log P(x) (IDF, exact traces)."""
    return {"bound": "single-sample (K=1)", "estimated": "estimated", "exact": "exact"}[model.likelihood_kind]


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| run | model | paper | paper bpd | our bpd | params | steps | images seen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = r["paper"]
        ours = f"{r['bpd']:.3f} ± {r['stderr']:.3f}" if not math.isnan(r["bpd"]) else "nan"
        if r.get("iw"):
            ours += f" (K=1); {r['iw']['bpd']:.3f} ± {r['iw']['stderr']:.3f} (IW, K={r['iw']['k']})"
        lines.append(f"| {os.path.basename(os.path.normpath(r['run']))} | {r['model']} | {paper.get('name') or '–'} | "
                     f"{_fmt(paper.get('bpd'), '.2f')} | {ours} | {r['num_params'] / 1e6:.2f}M | {r['step']} | {r['images_seen']:,} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories, checkpoint files or exported model.safetensors")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--table", action="store_true", help="print a markdown table of the runs against their papers")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--iw-samples", type=int, default=1, metavar="K",
                        help="also report the importance-weighted bound with K dequantization samples per image")
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help="evaluate only the first N images of the split (both bounds use the same N)")
    parser.add_argument("--iw-chunk", type=int, default=64,
                        help="importance samples per forward pass (memory: batch-size / iw-chunk images per forward)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if len(args.run_dirs) > 1 and not args.table:
        raise FlowlabError("several run directories need --table")
    check_at_least(args.iw_samples, 1, "--iw-samples")
    check_at_least(args.iw_chunk, 1, "--iw-chunk")
    check_at_least(args.max_examples, 1, "--max-examples")
    check_at_least(args.batch_size, 1, "--batch-size")
    check_device(args.device)
    if args.json:
        check_output_file(args.json, "--json")
    rows = [evaluate_run(d, args.split, args.batch_size, args.device, not args.no_ema, args.iw_samples, args.iw_chunk,
                         args.max_examples) for d in args.run_dirs]
    if args.table:
        if any("objective" in r for r in rows):
            raise FlowlabError("--table compares bits/dim runs; evaluate runs of other objectives one at a time")
        print(table(rows))
    elif "objective" in rows[0]:
        r = rows[0]
        print(f"{r['split']}: {r['line']} (n={r['n']}, objective {r['objective']}, step {r['step']}, "
              f"EMA {'on' if r['ema'] else 'off'}; data: {r['data']})")
    else:
        r = rows[0]
        print(f"{r['split']} bpd: {r['bpd']:.4f} ± {r['stderr']:.4f} (mean ± s.e. over n={r['n']} images, "
              f"{r['bound']}{' bound' if r['stochastic'] else ' log-likelihood'}, step {r['step']}, EMA {'on' if r['ema'] else 'off'}; data: {r['data']})")
        if r["iw"]:
            print(f"{r['split']} bpd (IW, K={r['iw']['k']}): {r['iw']['bpd']:.4f} ± {r['iw']['stderr']:.4f} "
                  f"(mean ± s.e. over n={r['iw']['n']} images, {r['iw']['bound']} bound; "
                  f"single-sample K=1: {r['bpd']:.4f})")
        elif args.iw_samples > 1:
            print(f"(--iw-samples {args.iw_samples} ignored: the model's log-likelihood is deterministic, "
                  "so the importance-weighted bound equals the K=1 number)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows if args.table else rows[0], f, indent=1)


if __name__ == "__main__":
    run_cli(main)
