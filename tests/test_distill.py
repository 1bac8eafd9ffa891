"""Probability-density distillation (engine/objective_distill.py, objective ``distill``): the
student's sampler with its density (Flow.sample_with_log_prob, IAF.inverse_with_ldj), the KL
estimator against a closed form, the frozen teacher, a short distillation, the teacher checks,
and the table script in its tiny mode."""
from __future__ import annotations

import math
import os

import pytest
import torch

from common.errors import FlowlabError
from data import load_dataset, toy2d
from engine.config import load_config
from engine.objectives import OBJECTIVES, DensityDistillation, NegativeLogLikelihood
from engine.sections import RunConfig
from engine.trainer import run_training
from models.architectures import build_model
from models.core.transform import Transform
from models.transforms.vector.iaf import IAF
from tests.helpers import ROOT, assert_all_parameters_get_gradient, read_metric

EXPERIMENTS = os.path.join(ROOT, "experiments")
EVAL = type("Eval", (), {"batch_size": 4096, "max_examples": 20000})
SMALL_EVAL = type("Eval", (), {"batch_size": 4096, "max_examples": 4000})


def _flow(kind, dim=2, steps=2, hidden=16):
    return build_model({"name": "vector_flow", "flow": kind, "steps": steps, "hidden_channels": hidden,
                        "hidden_blocks": 1, "kind": "orthogonal", "ortho_vectors": 0}, (dim,), None, {"kind": "none"})


def _perturb(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _random_autoregressive(kind, steps=3):
    """A MAF / IAF flow far enough from the identity: small weights, offsets and log-scales of order 0.5."""
    model = _perturb(_flow(kind, steps=steps), 0.1)
    with torch.no_grad():
        for layer in model.transforms:
            layer.made.out.bias.add_(0.5 * torch.randn_like(layer.made.out.bias))
    return model


def _gaussian(kind, mu, log_sigma):
    """A one-layer MAF / IAF with constant (mu, alpha): the diagonal Gaussian N(mu, exp(2 log_sigma))."""
    model = _flow(kind, dim=len(mu), steps=1)
    made = model.transforms[0].made
    with torch.no_grad():
        made.out.weight.zero_()
        made.out.bias.copy_(torch.tensor([*mu, *log_sigma]))
    return model


def _gaussian_kl(mu_q, ls_q, mu_p, ls_p):
    """KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) summed over independent coordinates."""
    return sum(lp - lq + (math.exp(2 * lq) + (mq - mp) ** 2) / (2 * math.exp(2 * lp)) - 0.5
               for mq, lq, mp, lp in zip(mu_q, ls_q, mu_p, ls_p))


# ---- the student's sampler and its density -------------------------------------------------------

@pytest.mark.parametrize("kind", ["iaf", "maf", "realnvp"])
def test_sample_with_log_prob_is_the_density_of_the_models_own_samples(kind, float64):
    model = _perturb(_flow(kind))
    z0 = torch.randn(64, 2)
    x, log_q = model.sample_with_log_prob(z0)
    assert torch.allclose(x, model.transforms.inverse(z0), atol=1e-10)  # what sample() draws from z0
    assert torch.allclose(log_q, model.log_prob(x), atol=1e-8)  # the density direction agrees
    x2, log_q2 = model(z0, as_sampler="inverse")  # the same through forward (what DDP runs)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)


def test_iaf_inverse_with_ldj_is_one_pass_and_matches_the_generic_fallback(float64):
    layer = _perturb(_flow("iaf", dim=5, steps=1)).transforms[0]
    assert isinstance(layer, IAF)
    z = torch.randn(16, 5)
    x, ldj = layer.inverse_with_ldj(z)
    x_ref, ldj_ref = Transform.inverse_with_ldj(layer, z)  # inverse, then the D-pass forward
    assert torch.allclose(x, x_ref, atol=1e-10) and torch.allclose(ldj, ldj_ref, atol=1e-10)
    calls = []
    hook = layer.made.register_forward_hook(lambda *a: calls.append(1))
    layer.inverse_with_ldj(z)
    hook.remove()
    assert len(calls) == 1


# ---- the KL estimator ------------------------------------------------------------------------

def test_kl_estimate_is_unbiased_against_the_gaussian_closed_form(one_thread):
    mu_s, ls_s, mu_t, ls_t = [0.5, -1.0], [0.2, -0.3], [0.0, -0.5], [0.4, 0.1]
    student, teacher = _gaussian("iaf", mu_s, ls_s), _gaussian("maf", mu_t, ls_t)
    objective = DensityDistillation(teacher=teacher)
    r = objective.evaluate(student, None, EVAL)
    exact = _gaussian_kl(mu_s, ls_s, mu_t, ls_t)
    assert r["n"] == 20000 and exact > 0.3
    assert abs(r["kl"] - exact) < 4 * r["kl_stderr"], (r["kl"], r["kl_stderr"], exact)
    # the training loss is the same estimator on the batch (beta = 1)
    loss, logs = objective(student, objective.draw_batch(student, 20000, torch.Generator().manual_seed(1)))
    assert abs(float(logs["kl"]) - exact) < 0.05 and float(loss.detach()) == pytest.approx(float(logs["kl"]))


def test_kl_is_zero_when_the_student_is_the_teacher_and_positive_otherwise(float64, one_thread):
    teacher = _random_autoregressive("maf")
    same = DensityDistillation(teacher=teacher)
    x, log_q, log_p = same.kl_terms(teacher, torch.randn(256, 2))  # student == teacher: exactly 0 per sample
    assert torch.allclose(log_q, log_p, atol=1e-8)
    for seed in range(3):  # different students: KL > 0 in expectation, here by many standard errors
        torch.manual_seed(seed)
        r = DensityDistillation(teacher=teacher).evaluate(_random_autoregressive("iaf"), None, SMALL_EVAL, seed=seed)
        assert r["kl"] > 5 * r["kl_stderr"] > 0, r


def test_gradients_reach_the_student_and_never_the_teacher():
    teacher = _perturb(_flow("maf"))
    objective = DensityDistillation(teacher=teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = _perturb(_flow("iaf"))
    loss, _ = objective(student, torch.randn(128, 2))
    assert_all_parameters_get_gradient(student, loss)
    assert all(p.grad is None for p in teacher.parameters())


def _fit(model, objective, draw, steps: int) -> None:
    """``steps`` Adam steps (lr 3e-3, clipping at 100) of ``objective`` on the batches ``draw(step)``."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        objective.start_step(step)
        loss = objective(model, draw(step))[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()


def test_a_short_distillation_reduces_the_kl(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = _flow("maf", steps=4)
    _fit(teacher, NegativeLogLikelihood(), lambda _: toy2d.sample("two_moons", 128, g), 60)  # a rough teacher
    objective, student = DensityDistillation(teacher=teacher), _flow("iaf", steps=4)
    before = objective.evaluate(student, None, SMALL_EVAL)
    _fit(student, objective, lambda _: objective.draw_batch(student, 128, g), 60)
    after = objective.evaluate(student, None, SMALL_EVAL)
    assert after["kl"] < before["kl"] - 5 * (before["kl_stderr"] + after["kl_stderr"]), (before["kl"], after["kl"])


# ---- runs: the teacher from a run directory, the checks, train.py and the table ----------------------

TINY = ["model.steps=2", "model.hidden_channels=16", "model.hidden_blocks=1", "train.batch_size=64",
        "train.log_every=5", "train.checkpoint_every=0", "train.sample_every=0", "eval.batch_size=500",
        "sample.n=200"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill") / "teacher")
    cfg = load_config(os.path.join(EXPERIMENTS, "distill_teacher_two_moons.yaml"),
                      [*TINY, "data.n_train=1000", "data.n_test=300", "train.steps=10", "train.eval_every=10"])
    run_training(RunConfig.from_resolved(cfg), out)
    return out


def test_the_objective_is_registered_with_validated_keys():
    assert OBJECTIVES["distill"] is DensityDistillation
    with pytest.raises(FlowlabError, match="'objective.anneal_steps' must be >= 0"):
        load_config(os.path.join(EXPERIMENTS, "distill_student_two_moons.yaml"), ["objective.anneal_steps=-1"])
    with pytest.raises(FlowlabError, match="unknown config key 'objective.energy'"):
        load_config(os.path.join(EXPERIMENTS, "distill_student_two_moons.yaml"), ["objective.energy=u1"])


def test_a_missing_or_incompatible_teacher_is_one_clear_error(tmp_path, teacher_run):
    with pytest.raises(FlowlabError, match="objective.teacher is not set"):
        DensityDistillation()
    with pytest.raises(FlowlabError, match=r"objective.teacher=\S+nowhere: run directory or model file not found.*"
                                           r"python train.py experiments/distill_teacher_two_moons.yaml"):
        DensityDistillation(teacher=str(tmp_path / "nowhere"))
    energy = str(tmp_path / "energy")  # a vector_flow, but fitted to an energy: not a density of data
    cfg = load_config(os.path.join(EXPERIMENTS, "toy2d_planar_u2.yaml"), [*TINY, "train.steps=1", "train.eval_every=0"])
    run_training(RunConfig.from_resolved(cfg), energy)
    with pytest.raises(FlowlabError, match="is a vector_flow run of objective reverse_kl; the teacher must be a "
                                           "vector_flow trained with objective.name=nll"):
        DensityDistillation(teacher=energy)
    objective = DensityDistillation(teacher=teacher_run)
    with pytest.raises(FlowlabError, match="objective.teacher models 2-D vectors: set data.dim=2, not 3"):
        objective.check(load_dataset("none", dim=3), _flow("iaf", dim=3))
    with pytest.raises(FlowlabError, match="PlanarFlow has no closed-form inverse: use model.flow=iaf"):
        objective.check(load_dataset("none", dim=2), _flow("planar"))
    with pytest.raises(FlowlabError, match="trains on none data"):
        objective.check(load_dataset("toy2d", n_train=10, n_test=10), _flow("iaf"))


def test_the_trainer_distills_a_teacher_run_and_eval_py_scores_it(tmp_path, teacher_run, one_thread):
    from eval import evaluate_run

    out = tmp_path / "student"
    cfg = load_config(os.path.join(EXPERIMENTS, "distill_student_two_moons.yaml"),
                      [f"objective.teacher={teacher_run}", *TINY, "train.steps=30", "train.eval_every=30",
                       "train.sample_every=30", "eval.max_examples=1000"])
    run_training(RunConfig.from_resolved(cfg), str(out))
    kl, nll, teacher_nll = (read_metric(out, f"test/{k}") for k in ("kl", "nll", "teacher_nll"))
    assert set(kl) == set(nll) == set(teacher_nll) == {0, 30} and kl[30] < kl[0], kl
    assert teacher_nll[0] == teacher_nll[30]  # the teacher is frozen
    assert set(read_metric(out, "train/kl")) == {5, 10, 15, 20, 25, 30}
    assert (out / "samples" / "step_0000030.png").is_file()
    r = evaluate_run(str(out), "test", None, "cpu")  # what eval.py prints
    assert r["objective"] == "distill" and r["kl"] == pytest.approx(kl[30]) and "KL(q_S || p_T)" in r["line"]


def test_the_table_script_runs_in_its_tiny_mode(tmp_path, capsys, one_thread):
    from scripts.distill_table import main

    main(["--tiny", "--toys", "two_moons", "--out", str(tmp_path / "t"), "--kl-samples", "500", "--batch", "100",
          "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| two_moons")]
    assert len(rows) == 2 and "teacher (MAF)" in rows[0] and "student (IAF)" in rows[1], out
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    kl = float(cells[3].split("±")[0])
    assert math.isfinite(kl) and kl > -0.05 and float(cells[4]) > 0 and float(cells[5]) > 0
    with pytest.raises(FlowlabError, match="already holds a run: choose another --out"):
        main(["--tiny", "--toys", "two_moons", "--out", str(tmp_path / "t")])
    with pytest.raises(FlowlabError, match="no experiments/distill_teacher_rings.yaml"):
        main(["--toys", "rings"])
