"""Train the flow-VAE of a config once per number K of posterior flow steps, through the
trainer and at the same budget, and print -ELBO and the importance-sampled -log p(x) per K
next to Rezende & Mohamed's MNIST table (arXiv:1505.05770).

    python scripts/vae_flow_table.py CONFIG [--k 0 10 20 40 80] [--out DIR] [section.key=value ...]

    python scripts/vae_flow_table.py experiments/vae_planar_fashion_mnist.yaml            # ~10 min on 2 CPU cores
    python scripts/vae_flow_table.py experiments/vae_planar_fashion_mnist.yaml --k 0 10 model.flow=radial \\
           train.steps=4000 eval.max_examples=10000 eval.iw_samples=5000
    python scripts/vae_flow_table.py experiments/vae_planar_fashion_mnist.yaml train.time_limit_minutes=1.5

Each K is ``train.py CONFIG model.steps=K [overrides]`` into ``DIR/k<K>`` (default DIR:
runs/<config name>_table): the config's budget (``train.steps``, or
``train.time_limit_minutes`` of training per K), its KL annealing (``objective.anneal_steps``)
and its evaluation (``eval.max_examples`` test images, ``eval.iw_samples`` importance
samples) are the same for every K; the numbers are the trainer's last test evaluation.
The paper's numbers are on binarized MNIST with a larger model trained far longer: the
columns are NOT comparable, only the trend in K is.
"""
from __future__ import annotations

import argparse
import json
import os

from common.errors import FlowlabError
from engine.cli import run_cli
from engine.config import load_config
from engine.sections import RunConfig

SEED_MNIST = {0: 89.9, 10: 87.5, 20: 86.5, 40: 85.7, 80: 85.1}  # Rezende & Mohamed 2015, planar, nats


def last_metrics(run_dir: str) -> dict:
    """The last recorded value of every metric of a run (metrics.jsonl) and the step it was recorded at."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out.update({k: (row["step"], v) for k, v in row.items() if k not in ("step", "images_seen")})
    return out


def train_one(config: str, k: int, overrides: list[str], out: str) -> dict:
    """Train the config with K = ``k`` posterior steps into ``out``; its final test numbers."""
    from engine.trainer import run_training

    cfg = RunConfig.from_resolved(load_config(config, [*overrides, f"model.steps={k}"]))
    if cfg.model["name"] != "flow_vae" or cfg.objective["name"] != "elbo":
        raise FlowlabError(f"{config} is not a flow-VAE config (model.name=flow_vae, objective.name=elbo)")
    if cfg.train.eval_every <= 0:
        raise FlowlabError("the table needs the trainer's test numbers: set train.eval_every > 0")
    summary = run_training(cfg, out)
    metrics = last_metrics(out)
    return {"k": k, "steps": summary["step"], "nelbo": metrics["test/nelbo"][1], "nll_is": metrics["test/nll_is"][1],
            "flow": cfg.model["flow"], "iw_samples": cfg.eval.iw_samples, "batch_size": cfg.train.batch_size,
            "data": summary["data"], "run": out}


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"| K ({r0['flow']}) | ours: -ELBO | ours: -log p(x), IS S={r0['iw_samples']} | steps (batch "
             f"{r0['batch_size']}) | seed: MNIST -log p(x) bound (R&M 2015) |", "|---|---|---|---|---|"]
    for r in rows:
        seed = f"{SEED_MNIST[r['k']]:.1f}" if r["k"] in SEED_MNIST else "-"
        lines.append(f"| {r['k']} | {r['nelbo']:.2f} | {r['nll_is']:.2f} | {r['steps']} | {seed} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a flow-VAE config, e.g. experiments/vae_planar_fashion_mnist.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[0, 10, 20, 40, 80], help="posterior flow steps K")
    parser.add_argument("--out", help="folder of the runs, one k<K> per K (default: runs/<config name>_table)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every K, e.g. train.steps=400")
    args = parser.parse_intermixed_args(argv)
    if any(k < 0 for k in args.k):
        raise FlowlabError(f"--k takes non-negative step counts, got {args.k}")
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0] + "_table")
    rows = []
    for k in args.k:
        rows.append(train_one(args.config, k, args.overrides, os.path.join(out, f"k{k}")))
        print(f"K={k}: {rows[-1]['steps']} steps; -ELBO {rows[-1]['nelbo']:.2f}, -log p(x) (IS) {rows[-1]['nll_is']:.2f}",
              flush=True)
    print()
    print(table(rows))
    print()
    print(f"Note: ours is {rows[0]['data']}; the seed column is binarized MNIST from the paper with a larger budget. "
          "The data sets differ, so the numbers are not comparable; compare the trend in K only.")
    return rows


if __name__ == "__main__":
    run_cli(main)
