"""Test bits/dim of a run, or a markdown table of runs against their papers.

    python eval.py RUN_DIR [--split test] [--json out.json]
    python eval.py --table RUN_DIR [RUN_DIR ...]
    python eval.py RUN_DIR --iw-samples 4096 [--iw-chunk 64]
    python eval.py model.safetensors            # an exported (shared) model; or a checkpoint file (best.pt)
    accelerate launch --multi_gpu --num_processes N eval.py RUN_DIR --iw-samples K   # split over N processes
    python eval.py RUN_DIR --iw-samples K --max-chunks C   # stop after C chunks; the same command continues

Per-image bits/dim are kept in ``RUN_DIR/eval/<split>-<bound>-K<k>/`` as they are computed
(``engine.eval_store``; ``--eval-dir``, ``--chunk-images``, ``--fresh``), each image's noise keyed by
(seed, image index) (``engine.per_image``), so 1 or N processes and interrupted or not give the
same number; ``eval.json["protocol"]`` and the table's columns say what the number is
(``engine.eval_protocol``), and ``--table`` adds paired differences against the first run.

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
from engine.eval_protocol import array_sha256, bound_name, identity, protocol, solver_text, weights_sha256
from engine.eval_store import ARRAY, EvalStore, result_dir
from engine.evaluate import Ranks, eval_seed, evaluate_per_image
from engine.metrics import mean_and_stderr
from engine.run import load_run
from engine.setup import load_data, make_objective


def evaluate_run(run_dir: str, split: str, batch_size: int | None, device: str, use_ema: bool = True,
                 iw_samples: int = 1, iw_chunk: int | None = None, max_examples: int | None = None,
                 accelerator=None, eval_dir: str | None = None, chunk_images: int | None = None,
                 max_chunks: int | None = None, seed: int | None = None, fresh: bool = False) -> dict:
    """The bits/dim of a run (both bounds where asked), per image on disk under ``eval_dir``
    (default ``RUN/eval``), with its protocol; all processes of ``accelerator`` must call it.
    ``"complete": False`` when ``max_chunks`` stopped it before the end (rerun to continue)."""
    cfg, model, info = load_run(run_dir, use_ema=use_ema, device=device)
    data = load_data(cfg)
    if cfg.objective["name"] != "bpd":
        return _evaluate_objective(run_dir, cfg, model, info, data, split, batch_size, iw_samples, max_examples)
    images = {"test": data.test, "train": data.train}[split]
    max_examples = max_examples or cfg.eval.max_examples  # the run's eval.max_examples unless --max-examples
    if max_examples:
        images = images[:max_examples]
    if images.shape[0] == 0:
        raise FlowlabError(f"the {split} split of {data.source} holds no images: nothing to evaluate")
    if tuple(images.shape[1:]) != tuple(model.data_shape):
        raise FlowlabError(f"data shape {tuple(images.shape[1:])} does not match the model's {model.data_shape}")
    ranks = Ranks(accelerator)
    seed = seed if seed is not None else cfg.eval.seed if cfg.eval.seed is not None else cfg.train.seed
    data_sha = ranks.broadcast(array_sha256(images) if ranks.is_main else None)  # once per evaluation
    weights = weights_sha256(model)
    root = eval_dir or default_eval_dir(run_dir)
    job = dict(model=model, images=images, batch_size=batch_size or cfg.eval.batch_size, accelerator=accelerator,
               chunk_images=chunk_images or cfg.eval.chunk_images, max_chunks=max_chunks, fresh=fresh, root=root,
               split=split, first=max_examples, iw_chunk=iw_chunk, device=device,
               ident=lambda k: identity(weights, info["step"], seed, data_sha, int(images.shape[0]), split, k))
    result = _bound(**job, k=1)
    iw = None
    if iw_samples > 1 and model.is_stochastic:  # --max-chunks is this call's budget over both bounds
        job["max_chunks"] = None if max_chunks is None else max_chunks - result["chunks_run"]
        iw = _bound(**job, k=iw_samples)
        iw["bound"] = bound_name("bound", iw_samples)
    _check_finite_result(result, run_dir, split)
    if iw:
        _check_finite_result(iw, run_dir, split)
    shared = result.pop("shared_draws") + (iw.pop("shared_draws") if iw else 0)
    row = {"run": run_dir, "model": cfg.model["name"], "split": split, **result, "bound": bound_kind(model),
           "stochastic": model.is_stochastic, "iw": iw,
           "step": info["step"], "images_seen": info["images_seen"], "ema": info["ema"],
           "num_params": sum(p.numel() for p in model.parameters()), "data": data.source, "paper": cfg.paper.to_dict()}
    row["protocol"] = protocol(cfg, model, info, data, split, job["ident"](iw_samples if iw else 1), ranks.world,
                               shared, iw_samples if iw else 1)
    return row


def default_eval_dir(path: str) -> str:
    """Where the per-image results of ``path`` live: ``RUN/eval`` for a run directory,
    ``DIR/eval-<name>`` for a checkpoint or model file (other weights, other results)."""
    if os.path.isdir(path):
        return os.path.join(path, "eval")
    return os.path.join(os.path.dirname(os.path.abspath(path)), "eval-" + os.path.splitext(os.path.basename(path))[0])


def _bound(model, images, batch_size, accelerator, chunk_images, max_chunks, fresh, root, split, first, iw_chunk,
           device, ident, k: int) -> dict:
    """One bound (K = k) over ``images``, resumed from and written to its result folder."""
    ranks = Ranks(accelerator)
    kind = "iw" if k > 1 else model.likelihood_kind
    folder = result_dir(root, split, kind, k, first)
    store = None
    if ranks.is_main:
        store = EvalStore(folder, ident(k), images.shape[0]) if fresh else EvalStore.open(folder, ident(k), images.shape[0])
        if store.note:
            print(f"note: {store.note}", flush=True)
    r = evaluate_per_image(model, images, batch_size, accelerator, eval_seed(ident(k)["seed"], 0), k, iw_chunk, store,
                           chunk_images, max_chunks, device=None if accelerator is not None else device)
    values = torch.from_numpy(r["values"])
    n = int(values.numel())
    out = {"n": n, "complete": r["complete"], "per_image": os.path.join(folder, ARRAY), "k": k,
           "chunks_run": r["chunks"], "shared_draws": r["shared_draws"], "nonfinite": int((~torch.isfinite(values)).sum()),
           "bpd": math.nan, "stderr": math.nan}
    if r["complete"]:
        out["bpd"], out["stderr"] = mean_and_stderr(values)
    else:
        out["nonfinite"] = 0
        out["done"] = int(n - len(store.pending())) if store is not None else None
    return out


def _check_finite_result(result: dict, run_dir: str, split: str) -> None:
    """A non-finite bits/dim is an error, not a number to report."""
    if result.get("complete", True) and not math.isfinite(result["bpd"]):
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
    """The markdown table of ``rows`` (``evaluate_run``'s), with each number's protocol; then the
    paired differences against the first run where runs share its test set."""
    lines = ["| run | model | paper | paper bpd | our bpd | bound | params | data | sha256 | version | split (n) | "
             "dequantizer | solver | EMA | global batch | processes | augment | steps | images seen |",
             "|" + "---|" * 19]
    for r in rows:
        paper, p = r["paper"], r["protocol"]
        ours = f"{r['bpd']:.3f} ± {r['stderr']:.3f}" if not math.isnan(r["bpd"]) else "nan"
        if r.get("iw"):
            ours += f" (K=1); {r['iw']['bpd']:.3f} ± {r['iw']['stderr']:.3f} (IW, K={r['iw']['k']})"
        t, d, b = p["training"], p["data"], p["bound"]
        batch = f"{t['global_batch']}" + (f" ({t['processes']} x {t['grad_accum_steps']} x {t['micro_batch']})"
                                          if t["processes"] else " (processes unknown)")
        lines.append(f"| {_name(r)} | {r['model']} | {paper.get('name') or '–'} | "
                     f"{_fmt(paper.get('bpd'), '.2f')} | {ours} | {('single-sample (K=1), ' if r.get('iw') else '') + b['name']} | "
                     f"{r['num_params'] / 1e6:.2f}M | {d['name']} | {d['sha256'][:12]} | {d['version']} | "
                     f"{d['split']} ({d['count']:,}) | {b['dequantizer'].get('kind', 'none')} | {solver_text(p)} | "
                     f"{'on' if p['weights']['ema'] else 'off'} | {batch} | {_fmt(t['processes'], 'd')} | "
                     f"{', '.join(t['augmentations']) or 'none'} | {r['step']:,} | {r['images_seen']:,} |")
    paired = paired_rows(rows)
    if paired:
        lines += ["", "| run | minus | bound | n | Δ bpd ± paired s.e. | unpaired s.e. |", "|---|---|---|---|---|---|"]
        lines += [f"| {_name(b)} | {_name(a)} | {bound} | {n:,} | {m:+.4f} ± {se:.4f} | {un:.4f} |"
                  for a, b, bound, n, m, se, un in paired]
    return "\n".join(lines)


def _name(row: dict) -> str:
    return os.path.basename(os.path.normpath(row["run"]))


def paired_rows(rows: list[dict]) -> list[tuple]:
    """(first run, run, bound, n, mean of per-image differences, its standard error, the unpaired
    standard error) for each later run evaluated on the same images as the first (same data sha256,
    count and split): the IW bound when both have it with the same K, else K = 1."""
    import numpy as np

    out = []
    a = rows[0]
    key = lambda r: (r["protocol"]["data"]["sha256"], r["protocol"]["data"]["count"], r["split"])  # noqa: E731
    for b in rows[1:]:
        if key(b) != key(a):
            continue
        both_iw = a.get("iw") and b.get("iw") and a["iw"]["k"] == b["iw"]["k"]
        ra, rb = (a["iw"], b["iw"]) if both_iw else (a, b)
        va, vb = np.load(ra["per_image"]), np.load(rb["per_image"])
        diff = torch.from_numpy(vb - va)
        mean, se = mean_and_stderr(diff)
        unpaired = math.hypot(ra["stderr"], rb["stderr"])
        out.append((a, b, f"IW K={ra['k']}" if both_iw else "K=1", int(diff.numel()), mean, se, unpaired))
    return out


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
                        help="evaluate only the first N images of the split (both bounds use the same N; "
                             "default: the run's eval.max_examples, else the whole split)")
    parser.add_argument("--iw-chunk", type=int, default=64,
                        help="importance samples per forward pass (memory: batch-size / iw-chunk images per forward)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="one process: this device; under accelerate launch each process takes its own")
    parser.add_argument("--seed", type=int, help="noise seed of the per-image draws (default: eval.seed, else train.seed)")
    parser.add_argument("--eval-dir", help="where per-image results are kept and resumed from (default: RUN/eval)")
    parser.add_argument("--chunk-images", type=int, metavar="N",
                        help="images per chunk written to --eval-dir (default: eval.chunk_images, else ~2^16 forwards)")
    parser.add_argument("--max-chunks", type=int, metavar="N",
                        help="stop after N chunks of this call (a time budget); a rerun continues from the results kept")
    parser.add_argument("--fresh", action="store_true", help="ignore (and overwrite) per-image results kept earlier")
    args = parser.parse_args()
    if len(args.run_dirs) > 1 and not args.table:
        raise FlowlabError("several run directories need --table")
    check_at_least(args.iw_samples, 1, "--iw-samples")
    check_at_least(args.iw_chunk, 1, "--iw-chunk")
    check_at_least(args.max_examples, 1, "--max-examples")
    check_at_least(args.batch_size, 1, "--batch-size")
    check_at_least(args.chunk_images, 1, "--chunk-images")
    check_at_least(args.max_chunks, 1, "--max-chunks")
    check_at_least(args.seed, 0, "--seed")
    check_device(args.device)
    if args.json:
        check_output_file(args.json, "--json")
    accelerator, device = None, args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch (or torchrun) on several processes
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=args.device == "cpu")
        device = accelerator.device
    rows = [evaluate_run(d, args.split, args.batch_size, device, not args.no_ema, args.iw_samples, args.iw_chunk,
                         args.max_examples, accelerator, args.eval_dir, args.chunk_images, args.max_chunks,
                         args.seed, args.fresh) for d in args.run_dirs]
    if accelerator is not None:
        # every rank tears the process group down now, together: left to interpreter exit, the
        # collective backend's threads can abort a finished process (SIGABRT, "terminate called")
        main = accelerator.is_main_process
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if not main:
            return
    stopped = [r for r in rows for part in (r, r.get("iw") or {}) if part.get("complete") is False]
    if stopped:
        for r in stopped:
            part = r if not r["complete"] else r["iw"]
            print(f"stopped by --max-chunks: {part['done']:,} of {part['n']:,} {r['split']} images scored (K={part['k']}) "
                  f"in {os.path.dirname(part['per_image'])}; run the same command again to continue")
        return
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
    if not args.table and rows[0].get("protocol"):
        r = rows[0]
        print(f"processes: {r['protocol']['eval_processes']}; per-image results: {os.path.dirname(r['per_image'])}; "
              f"data sha256 {r['protocol']['data']['sha256'][:12]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows if args.table else rows[0], f, indent=1)


if __name__ == "__main__":
    run_cli(main)
