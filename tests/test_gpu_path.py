"""The GPU path, checked on the CPU (issue 14, item 3):

* ``train.compile`` (``engine/compile.py``): validated keys; the compiled forward gives the
  eager loss and gradients (Dynamo + AOTAutograd, ``backend=aot_eager``: no C++ build in the
  test; the trainer test and the suite trace with Dynamo alone, ``eager``); parameter names stay; a compile failure falls back to eager with one note and the
  same random draws; the trainer wires it;
* bf16 autocast: every family's tiny config (``tests/test_contract.py`` TINY), trained three
  steps, gives bits/dim (nats/dim / ln 2 for vectors and the VAE's -ELBO) within 0.01 of float32
  on a fixed batch;
* no host synchronisation in the training step: the trainer's and the layers' code read no
  tensor on the host (``item``, ``bool``, ``float``, ``int``, ``tolist``, ``numpy``) during
  ``device_step``, and ``fit`` reads only at its log points;
* no tensor is made on torch's default device in the training step (the default device made ``meta``,
  which mixes with no real device: a tensor made without ``device=`` fails here, not on the first GPU);
* a non-finite step (a NaN loss with finite gradients, a NaN gradient, an infinite gradient
  from a finite loss) changes nothing: weights, Adam's moments and step count, the EMA and
  the buffers keep their values bit for bit; a skipped first step leaves Adam as new;
* ``benchmarks/gpu_suite.py --quick`` runs and prints its table, and every row of the full suite
  (paper config x mode) resolves at its per-GPU batch and builds the paper config's model.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from benchmarks import gpu_suite
from common.errors import FlowlabError
from data import ImageDataset
from engine.compile import compile_fallback, compile_forward, is_compiled, uncompile
from engine.config import load_config
from engine.metrics import bits_per_dim
from engine.objectives import BitsPerDim
from engine.trainer import Trainer
from models.nets.lipschitz import SpectralNormBase
from tests.helpers import (ROOT, SUBSET, data_shape, meta_parameter_count, random_images, resolve_overrides,
                           run_command)
from tests.test_contract import DATA_KIND, DATA_SHAPE, TINY, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def make_trainer(run_dir, family="glow", extra=(), objective=None) -> Trainer:
    cfg = resolve_overrides([f"model.name={family}", *TINY[family], "train.batch_size=4", "train.init_batch_size=8",
                             *extra])
    bits = cfg["data"]["n_bits"]
    x = random_images(16, DATA_SHAPE, bits, "cpu", generator=torch.Generator().manual_seed(0))
    return Trainer(cfg, str(run_dir), data=ImageDataset(x, x[:4], bits, "npz", "random test images"),
                   tensorboard=False, objective=objective)


# ---- train.compile ------------------------------------------------------------------------------

def test_compile_keys_are_validated():
    assert resolve_overrides(["model.name=glow"])["train"]["compile"] == "none"
    cfg = resolve_overrides(["model.name=glow", "train.compile=default", "train.compile_backend=aot_eager"])
    assert (cfg["train"]["compile"], cfg["train"]["compile_backend"]) == ("default", "aot_eager")
    for bad in ("train.compile=fast", "train.compile=true", "train.compile_backend=tensorrt"):
        with pytest.raises(FlowlabError, match="must be one of|expects str"):
            resolve_overrides(["model.name=glow", bad])


# every family the trainer compiles (ffjord is never compiled: engine.compile.EAGER_FAMILIES)
COMPILED_FAMILIES = ["glow", "flowpp", "resflow", "realnvp", "idf", "argmax"]


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_compiled_forward_gives_the_eager_loss_and_gradients(family):
    torch.manual_seed(0)
    model, data = tiny_model(family, torch.device("cpu"))
    model.train()
    x = data.batch(4, "cpu", generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss, _ = data.loss(model, x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    assert compile_forward(model, "default", "aot_eager", log=lambda line: None)  # AOTAutograd: the backward graph too
    try:
        compiled_loss, compiled_grads = loss_and_grads()
        assert compile_fallback(model) is None
        assert [n for n, _ in model.named_parameters()] == names and "forward" not in model.state_dict()
    finally:
        uncompile(model)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-6, atol=0), (compiled_loss, eager_loss)
    for g_c, g_e in zip(compiled_grads, eager_grads):
        assert torch.allclose(g_c, g_e, rtol=1e-4, atol=1e-6)


def test_a_compile_failure_falls_back_to_eager_with_one_note(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    torch.manual_seed(0)
    model, data = tiny_model("realnvp", torch.device("cpu"))
    x = data.batch(4, "cpu", generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    expected = model.log_prob(x)

    def broken(fn, **kwargs):
        def call(*args, **kw):
            torch.rand(7)  # a failed attempt that drew noise first: the eager call must draw the same again
            raise TorchDynamoException("cannot trace this layer")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    notes = []
    compile_forward(model, "default", "eager", what="model 'realnvp'", log=notes.append)
    torch.manual_seed(5)
    got = model(x)
    assert torch.equal(got, expected)
    assert len(notes) == 1 and "model 'realnvp' does not compile" in notes[0] and "cannot trace" in notes[0]
    assert "cannot trace" in compile_fallback(model)
    model(x)
    assert len(notes) == 1, "the note is said once"


def test_the_trainer_compiles_the_forward_and_takes_the_eager_step(tmp_path):
    eager = make_trainer(tmp_path / "eager")
    compiled = make_trainer(tmp_path / "compiled", extra=["train.compile=default", "train.compile_backend=eager"])
    assert is_compiled(compiled.model) and not is_compiled(eager.model)
    for step in range(2):
        a, b = eager.train_step(step), compiled.train_step(step)
        assert float(b["bpd"]) == pytest.approx(float(a["bpd"]), rel=1e-6)
    assert compile_fallback(compiled.model) is None
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())
    model = compiled.model  # accelerate's bf16 wraps the forward, keeping the one it wraps as _original_forward
    model._original_forward = model.forward
    model.forward = lambda *args, **kwargs: model._original_forward(*args, **kwargs)
    assert is_compiled(model)


@pytest.mark.parametrize("activation_memory", ["checkpoint", "invertible"])
def test_compile_under_activation_memory_runs_eagerly_and_says_why(tmp_path, activation_memory):
    # Dynamo cannot trace checkpoint's context_fn: compiled, the first call fell back to eager
    eager = make_trainer(tmp_path / "eager", extra=[f"train.activation_memory={activation_memory}"])
    both = make_trainer(tmp_path / "both", extra=[f"train.activation_memory={activation_memory}", "train.compile=default",
                                                  "train.compile_backend=eager"])
    assert not is_compiled(both.model) and compile_fallback(both.model) is None  # never tried
    for step in range(2):
        a, b = eager.train_step(step), both.train_step(step)
        assert float(b["bpd"]) == float(a["bpd"])
    notes = []
    model, _ = tiny_model("glow", torch.device("cpu"))
    assert not compile_forward(model, "default", "eager", what="model 'glow'", log=notes.append,
                               activation_memory=activation_memory)
    assert len(notes) == 1 and f"runs eagerly under train.activation_memory={activation_memory}" in notes[0]


def test_ffjord_is_not_compiled_and_says_why(tmp_path):
    notes = []
    model, _ = tiny_model("ffjord", torch.device("cpu"))
    assert not compile_forward(model, "default", "eager", what="model 'ffjord'", log=notes.append, family="ffjord")
    assert "forward" not in model.__dict__ and len(notes) == 1 and "runs eagerly" in notes[0]


# ---- bf16 autocast per family ---------------------------------------------------------------------

def bits_per_dimension(model, data, x) -> torch.Tensor:
    if data.kind == "image":
        return bits_per_dim(model.log_prob(x), math.prod(x.shape[1:])).mean()
    if data.kind == "labelled":  # a classifier (bnn): its loss (label NLL + KL / N), per input dimension, in bits
        return data.loss(model, x)[0] / (math.prod(data.shape) * math.log(2))
    density = model.log_prob(x) if hasattr(model, "log_prob") else model.elbo(x)
    return (-density / (math.prod(data.shape) * math.log(2))).mean()


@pytest.mark.parametrize("family", sorted(TINY))
def test_bf16_autocast_bits_per_dim_within_0_01_of_float32(family):
    """The trainer's bf16 (``train.mixed_precision=bf16``: accelerate's autocast) on the CPU:
    conditioner networks in bf16, log-dets, priors and bits/dim in float32."""
    torch.manual_seed(0)
    model, data = tiny_model(family, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few training steps in float32
        loss, _ = data.loss(model, data.batch(8, "cpu", generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = data.batch(16, "cpu", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(2)
        full = bits_per_dimension(model, data, x)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = bits_per_dimension(model, data, x)
    assert half.dtype == torch.float32 and bool(torch.isfinite(half))
    assert abs(float(half - full)) <= 0.01, (family, float(full), float(half))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process (its mixed precision among it): reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sample_grids_are_drawn_in_the_runs_precision(tmp_path, precision, monkeypatch, fresh_accelerate_state):
    """The trainer's sample grids (and benchmarks/throughput.py's timing) sample under the run's
    autocast: bf16 conditioners for a bf16 run, float32 otherwise."""
    trainer = make_trainer(tmp_path, extra=[f"train.mixed_precision={precision!r}"])
    seen = []
    sample = trainer.model.sample
    monkeypatch.setattr(trainer.model, "sample", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or sample(*a, **k))
    trainer.save_samples()
    assert seen and set(seen) == {precision == "bf16"}


def test_sample_py_samples_in_the_runs_precision_unless_told(tmp_path):
    out = tmp_path / "run"
    run_command([sys.executable, "train.py", os.path.join(ROOT, "experiments", "glow_small.yaml"), "--out", str(out),
                 f"data.path={SUBSET}", "data.name=npz", "model.levels=2", "model.steps=1", "model.hidden_channels=8",
                 "train.steps=2", "train.batch_size=4", "train.init_batch_size=8", "train.eval_every=0",
                 "train.sample_every=0", "eval.max_examples=8", "train.mixed_precision=bf16"])
    for flags, said in [([], "bf16 autocast"), (["--precision", "fp32"], "float32")]:
        proc = run_command([sys.executable, "sample.py", str(out), "--n", "2", "--out", str(tmp_path / "g.png"), *flags])
        assert f", {said}); non-finite pixels: 0" in proc.stdout, proc.stdout


# ---- no host synchronisation in the step ------------------------------------------------------

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
PROJECT = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "models", "data", "common"))


@pytest.fixture
def host_reads(monkeypatch):
    """Records (file:line, trainer step) of every host read of a tensor made by the project's code."""
    seen, state = [], {"trainer": None}

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT):
                trainer = state["trainer"]
                seen.append((f"{os.path.relpath(caller, ROOT)}:{sys._getframe(1).f_lineno} {name}",
                             None if trainer is None else trainer.step))
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return seen, state


@pytest.mark.parametrize("family", ["glow", "flowpp", "idf"])
def test_the_training_step_reads_nothing_on_the_host(tmp_path, family, host_reads):
    trainer = make_trainer(tmp_path, family, ["train.ema=0.9", "train.grad_clip=1.0"])
    assert trainer.finite_guard == "host"  # the CPU reads its flag (free there); the GPU's way is tested here:
    trainer.finite_guard = "mask"
    seen, _ = host_reads
    seen.clear()  # (set-up reads: data-dependent init)
    flags = [trainer.device_step(step)[1] for step in range(3)]
    assert seen == [], seen
    assert all(f.dtype == torch.bool and f.dim() == 0 for f in flags)


@pytest.mark.parametrize("guard", ["mask", "host"])
@pytest.mark.parametrize("family", [f for f in TINY if DATA_KIND[f] == "image"])
def test_the_training_step_makes_no_tensor_on_the_default_device(tmp_path, family, guard):
    """The whole step (objective, backward, clipping, the finite flag and its guard, the optimizer,
    the EMA, the hooks) with torch's default device made ``meta``, which mixes with no real device:
    a tensor made without ``device=`` raises here as it would break the first step on a GPU
    (``tests/test_contract.py`` holds each model's own forward, backward and sampling to the same).
    The batches are fetched first (the data layer builds its batches on the host on purpose), and
    one step runs before (torch's optimizers make their step counts on the host, on purpose, at
    their first step: torch 2.11's Adam with ``torch.tensor(0.0)``)."""
    trainer = make_trainer(tmp_path, family, ["train.ema=0.9", "train.grad_clip=1.0"])
    trainer.finite_guard = guard
    batches = [trainer._batch(step) for step in range(3)]
    trainer._batch = batches.__getitem__
    trainer.device_step(0)
    with torch.device("meta"):
        flags = [trainer.device_step(step)[1] for step in (1, 2)]
    assert all(f.device.type == "cpu" and bool(f) for f in flags)


def test_a_residual_flow_step_reads_once_per_power_iteration_round(tmp_path, host_reads):
    """The one read left in a Residual Flow's step (beside the roulette draws, made on the CPU):
    the stopping tests of all spectral norms at once, once per round, not once per layer."""
    trainer = make_trainer(tmp_path, "resflow")
    trainer.finite_guard = "mask"
    sn = [m for m in trainer.model.modules() if isinstance(m, SpectralNormBase)]
    seen, _ = host_reads
    for step in range(3):
        seen.clear()
        trainer.device_step(step)
        reads = [where for where, _ in seen if where.startswith(os.path.join("models", "nets", "lipschitz.py"))]
        rounds, alone = max(m.last_iters for m in sn), sum(m.last_iters for m in sn)  # (alone: a read per iteration)
        assert len(reads) == rounds < alone, (len(reads), rounds, alone)


def test_fit_reads_the_flags_only_where_it_logs(tmp_path, host_reads):
    trainer = make_trainer(tmp_path, extra=["train.steps=8", "train.log_every=4", "train.eval_every=0",
                                            "train.sample_every=0", "train.checkpoint_every=0"])
    trainer.finite_guard = "mask"  # the GPU's guard (the CPU's reads every step's flag)
    seen, state = host_reads
    seen.clear()
    state["trainer"] = trainer
    trainer.fit()
    steps = {step for _, step in seen}
    # settled at the step before each log point (3, 7: before the count moves on), logged at 4 and 8
    # (where the last step also saves its checkpoint and the summary)
    assert steps <= {3, 4, 7, 8} and {3, 4, 7, 8} <= steps, sorted(seen)


# ---- a non-finite step changes nothing -----------------------------------------------------------

class Injected(BitsPerDim):
    """bits/dim, made non-finite at ``at_step`` in the way ``how`` says."""

    def __init__(self, how: str, at_step: int):
        super().__init__()
        self.how, self.at_step, self.step = how, at_step, -1

    def start_step(self, step):
        self.step = step

    def __call__(self, model, batch):
        loss, logs = super().__call__(model, batch)
        if self.step != self.at_step:
            return loss, logs
        if self.how == "nan_loss":  # the loss alone: the gradients stay finite
            return loss + float("nan"), logs
        if self.how == "nan_grad":
            return loss * torch.tensor(float("nan")), logs
        y = next(model.parameters()) * 1.0  # a finite loss whose gradient is infinite
        y.register_hook(lambda grad: grad * float("inf"))
        return loss + (y - y.detach()).sum(), logs


def snapshot(trainer) -> dict:
    inner = trainer.optimizer.optimizer
    out = {f"p:{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    out.update({f"b:{n}": b.clone() for n, b in trainer.model.named_buffers()})
    out.update({f"ema:{n}": v.clone() for n, v in trainer.ema.shadow.items()})
    for i, p in enumerate(inner.param_groups[0]["params"]):
        out.update({f"opt:{i}:{k}": v.clone() for k, v in inner.state.get(p, {}).items()})
    return out


@pytest.mark.parametrize("guard", ["mask", "host"])
@pytest.mark.parametrize("how", ["nan_loss", "nan_grad", "inf_grad"])
def test_a_nonfinite_step_changes_nothing(tmp_path, how, guard):
    trainer = make_trainer(tmp_path, extra=["train.ema=0.9"], objective=Injected(how, at_step=1))
    trainer.finite_guard = guard
    metrics, finite = trainer.device_step(0)
    assert bool(finite)
    before = snapshot(trainer)
    assert before["opt:0:step"] == 1
    metrics, finite = trainer.device_step(1)
    assert not bool(finite)
    after = snapshot(trainer)
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed
    metrics, finite = trainer.device_step(2)
    assert bool(finite) and snapshot(trainer)["opt:0:step"] == 2


@pytest.mark.parametrize("guard", ["mask", "host"])
def test_a_skipped_first_step_leaves_adam_as_new(tmp_path, guard):
    skipped = make_trainer(tmp_path / "a", objective=Injected("nan_grad", at_step=0))
    skipped.finite_guard = guard
    fresh = make_trainer(tmp_path / "b")
    assert not bool(skipped.device_step(0)[1])
    assert bool(skipped.device_step(1)[1]) and bool(fresh.device_step(1)[1])
    for (name, p), q in zip(skipped.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), name


def test_fit_counts_a_skipped_step_between_log_points(tmp_path, capsys):
    trainer = make_trainer(tmp_path, extra=["train.steps=6", "train.log_every=6", "train.eval_every=0",
                                            "train.sample_every=0", "train.checkpoint_every=0"],
                           objective=Injected("nan_loss", at_step=2))
    summary = trainer.fit()
    assert summary["nonfinite_steps"] == 1 and summary["step"] == 6
    assert "non-finite loss or gradient at step 2; step skipped (1 so far)" in capsys.readouterr().out


# ---- the suite runs ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(gpu_suite.MODES))
def test_every_row_of_the_gpu_suite_resolves_at_its_per_gpu_batch(mode):
    """Every paper config the suite runs on a GPU, in every mode, resolves (a row that failed on a
    config error would cost GPU minutes to find), at the paper's per-GPU batch with the mode's
    precision, compile and layout settings, and builds (on the meta device) the paper config's
    model, for the images the suite feeds it."""
    runs = gpu_suite.rows_to_run(argparse.Namespace(quick=False, configs=gpu_suite.PAPER_CONFIGS))
    assert [label for label, *_ in runs] == gpu_suite.PAPER_CONFIGS
    for label, family, raw, overrides in runs:
        paper = load_config(os.path.join(ROOT, "experiments", f"{label}.yaml"))
        cfg = gpu_suite.row_config(raw, overrides, mode)
        assert cfg.model["name"] == family
        assert cfg.train.batch_size * gpu_suite.PAPER_GPUS.get(label, 1) == paper["train"]["batch_size"], label
        assert cfg.train.mixed_precision == ("no" if mode == "fp32" else "bf16"), label
        assert cfg.train.compile == ("default" if "compile" in mode else paper["train"]["compile"]), label
        if "channels_last" in mode:
            assert cfg.train.memory_format == "channels_last", label
        resolved = cfg.to_dict()
        shape = tuple(gpu_suite._random_data(cfg, 1, quick=False).train.shape[1:])
        assert shape == data_shape(paper), label
        assert meta_parameter_count(resolved, shape) == meta_parameter_count(paper, shape), label


def test_gpu_suite_quick_prints_one_table():
    with tempfile.TemporaryDirectory():
        proc = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_suite.py"), "--quick", "--families", "glow", "--steps", "1",
                               "--warmup", "0", "--sample-n", "2", "--modes", "fp32", "bf16+compile"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| family | config | params | batch | mode | img/s | peak GB")
    rows = [line.split("|")[1:-1] for line in table[2:]]
    assert len(rows) == 2 and all(float(r[5]) > 0 for r in rows), proc.stdout
    assert {r[4].strip() for r in rows} == {"fp32", "bf16+compile"}
    assert all(float(r[8]) >= 0 for r in rows if r[4].strip() == "bf16+compile"), proc.stdout


def test_bf16_bpd_prints_one_row_per_config_within_0_01():
    proc = run_command([sys.executable, "benchmarks/bf16_bpd.py", "experiments/glow_small.yaml", "--steps", "1",
                        "--batch", "4", "--eval-n", "4", "--set", "data.name=npz", "--set", f"data.path={SUBSET}",
                        "--set", "model.levels=2", "--set", "model.steps=1", "--set", "model.hidden_channels=8"])
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| experiments/")]
    assert len(rows) == 1 and rows[0][3].strip() == "1", proc.stdout
    assert abs(float(rows[0][6])) <= 0.01 and float(rows[0][4]) > 0, proc.stdout
