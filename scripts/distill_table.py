"""Probability-density distillation, MAF teacher -> IAF student, measured: for each 2-D toy,
train the teacher (``experiments/distill_teacher_<toy>.yaml``, maximum likelihood) and then
the student (``experiments/distill_student_<toy>.yaml``, KL(q_S || p_T) on its own samples)
through the trainer, and print a markdown table of

    test log-likelihood   mean ± s.e. over the teacher's test split (nats), the student's by
                          its density direction (D sequential MADE passes per IAF layer)
    KL(q_S || p_T)        mean ± s.e. of log q_S(x) - log p_T(x) over fresh student samples
    sampling / density    milliseconds per batch of ``--batch`` points (best of ``--repeats``,
                          ``benchmarks/maf_iaf.py``'s timer): MAF scores in one pass per layer
                          and samples in D; IAF the other way round (arXiv:1705.07057 §3.3)

    python scripts/distill_table.py                          # two_moons, 8gaussians; ~5 min on 2 loaded cores
    python scripts/distill_table.py --toys two_moons --steps 3000 --out runs/distill_table
    python scripts/distill_table.py --tiny                   # seconds: tiny models, tiny data (the test)

Runs go to ``OUT/teacher_<toy>`` and ``OUT/student_<toy>`` (default OUT: runs/distill_table;
a run already there is a one-line error).  ``--steps`` is the budget of each run (teacher
and student alike).  On 2-D data D = 2, so the sequential direction costs only two MADE
passes per layer; ``benchmarks/maf_iaf.py`` shows the gap growing with D.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common.errors import FlowlabError
from engine.cli import run_cli
from engine.config import load_config
from engine.sections import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.steps=2", "model.hidden_channels=16", "model.hidden_blocks=1", "data.n_train=2000",
        "data.n_test=500", "train.batch_size=64", "eval.batch_size=500", "sample.n=500"]


def train_pair(toy: str, steps: int, out: str, overrides: list[str]) -> tuple[str, str]:
    """Train the teacher and then the student of ``toy`` for ``steps`` each; their run directories."""
    from engine.trainer import run_training

    runs = {}
    for role in ("teacher", "student"):
        run_dir = os.path.join(out, f"{role}_{toy}")
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            raise FlowlabError(f"{run_dir} already holds a run: choose another --out")
        extra = [f"objective.teacher={runs['teacher']}"] if role == "student" else []
        if role == "student":  # the student's data section is data.name=none: no toy keys
            extra += [o for o in overrides if not o.startswith("data.")]
        else:
            extra += overrides
        cfg = load_config(os.path.join(ROOT, "experiments", f"distill_{role}_{toy}.yaml"),
                          [*extra, f"train.steps={steps}", f"train.eval_every={steps}", "train.sample_every=0",
                           f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 10)}"])
        run_training(RunConfig.from_resolved(cfg), run_dir)
        runs[role] = run_dir
    return runs["teacher"], runs["student"]


def measure(teacher_dir: str, student_dir: str, batch: int, repeats: int, kl_samples: int) -> dict:
    """Test log-likelihoods, the KL estimate and the per-batch times of one teacher / student pair."""
    from benchmarks.maf_iaf import timed
    from engine.objectives import DensityDistillation
    from engine.run import load_run

    s_cfg, student, _ = load_run(student_dir)
    objective = DensityDistillation(teacher=teacher_dir)
    teacher = objective.teacher_model
    eval_cfg = type("Eval", (), {"batch_size": s_cfg.eval.batch_size, "max_examples": kl_samples})
    r = objective.evaluate(student, None, eval_cfg, seed=s_cfg.train.seed)
    x = objective.teacher_test[:batch]
    times = {}
    for name, model in (("teacher", teacher), ("student", student)):
        times[name] = {"sample": timed(lambda: model.sample(x.shape[0]), repeats),
                       "density": timed(lambda: model.log_prob(x), repeats)}
    return {"r": r, "times": times, "batch": x.shape[0], "teacher_flow": load_run(teacher_dir)[0].model["flow"],
            "student_flow": s_cfg.model["flow"], "steps": s_cfg.train.steps}


def table(rows: list[tuple[str, dict]]) -> str:
    def pm(r, name):
        return f"{-r[name]:.3f} ± {r[name + '_stderr']:.3f}"

    lines = ["| data | model | test log-likelihood (nats) | KL(q_S ‖ p_T) (nats) | sampling (ms / batch) "
             "| density (ms / batch) |", "|---|---|---|---|---|---|"]
    for toy, m in rows:
        r, t = m["r"], m["times"]
        lines.append(f"| {toy} | teacher ({m['teacher_flow'].upper()}) | {pm(r, 'teacher_nll')} | – "
                     f"| {t['teacher']['sample']:.2f} | {t['teacher']['density']:.2f} |")
        lines.append(f"| {toy} | student ({m['student_flow'].upper()}) | {pm(r, 'nll')} "
                     f"| {r['kl']:.3f} ± {r['kl_stderr']:.3f} | {t['student']['sample']:.2f} "
                     f"| {t['student']['density']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toys", nargs="+", default=["two_moons", "8gaussians"])
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each teacher and each student")
    ap.add_argument("--out", default="runs/distill_table")
    ap.add_argument("--batch", type=int, default=1000, help="points per timed batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kl-samples", type=int, default=10000, help="fresh student samples for the KL (and test points)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny models and data, --steps 20 (a smoke run)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for both configs (data.* the teacher's only)")
    args = ap.parse_intermixed_args(argv)
    for key in ("steps", "batch", "repeats", "kl_samples", "threads"):
        if getattr(args, key) < 1:
            raise FlowlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for toy in args.toys:
        if not os.path.isfile(os.path.join(ROOT, "experiments", f"distill_teacher_{toy}.yaml")):
            raise FlowlabError(f"no experiments/distill_teacher_{toy}.yaml (and distill_student_{toy}.yaml) for --toys {toy}")
    steps = 20 if args.tiny else args.steps
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    torch.set_num_threads(args.threads)
    t0, rows = time.perf_counter(), []
    for toy in args.toys:
        teacher_dir, student_dir = train_pair(toy, steps, args.out, overrides)
        rows.append((toy, measure(teacher_dir, student_dir, args.batch, args.repeats, args.kl_samples)))
    took = time.perf_counter() - t0
    m = rows[0][1]
    print(f"Density distillation, MAF teacher -> IAF student, {steps} steps each; times per batch of {m['batch']} "
          f"points, best of {args.repeats}, {args.threads} thread(s); KL on {args.kl_samples} fresh student samples; "
          f"took {took:.0f} s")
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    run_cli(main)
