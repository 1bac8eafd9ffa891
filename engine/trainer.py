"""The model-agnostic trainer, on HF accelerate.

It knows the objective (``engine.objectives``: ``objective(model, batch) -> (loss, logs)``,
by default bits/dim plus the auxiliary losses of ``model(x, return_aux=True)``) and the
model hooks of ``models.core.hooks`` (which ``Flow`` and the flow-VAE gather from their
layers), and calls them unconditionally.  What a batch is, what is evaluated and what a
sample is, it asks the objective: ``objective.start_step(step)`` before each optimizer step
(annealing), ``objective.draw_batch`` when the data set has no examples (energy fits draw
from the model's base), ``objective.evaluate`` (test bits/dim, NLL, -ELBO and IS -log p(x),
reverse KL) and ``objective.save_samples`` (image grids, 2-D figures).  One process, several
GPUs or several nodes: start it with ``accelerate launch``.  It reads the typed config (``engine.sections.RunConfig``); the
checkpoint's and the EMA's formats belong to ``engine.checkpoint`` and ``engine.ema``.

Per optimizer step: the global batch ``train.batch_size`` is split over processes and,
on each, into ``train.grad_accum_steps`` = N micro-batches of
``batch_size / (world * N)``; the gradient is that of the mean loss over the global batch,

    g = (1/N) sum_i grad loss(micro-batch i)     (all-reduced over ranks once, after the last)

(``no_sync`` on the first N - 1 micro-batches).  A non-finite loss or gradient skips the
step on every rank together; then gradient clipping, the optimizer step, EMA and the
after-step hooks.  The step reads nothing on the host (``device_step``): whether it was finite
is a device flag that keeps or discards its update (``engine.finite_step``), and ``fit`` reads
the flags of the steps since the last read where it logs or needs them (``_settle_due``).
``train.compile`` compiles the model's forward (``engine.compile``).  Progress is counted in images seen.

Checkpoints (``save``) are written only from a good state: not inside a non-finite streak,
finite weights, and a finite loss and gradient on the next step's batch, so a diverging run
never replaces the last good checkpoint; ``engine.checkpoint_store`` keeps the last
``train.keep_checkpoints``, ``best.pt`` (lowest test bpd) and ``model.safetensors``.
``train.max_nonfinite`` consecutive skipped steps stop the run, or, with
``train.nonfinite_rollback=N``, roll it back to the last good checkpoint with the learning
rate times ``train.rollback_lr_factor`` (N times at most).  ``run_training`` holds the run
directory's lock (``engine.run_lock``) for the whole run.  All randomness of micro-batch
``i`` of step ``s`` on rank ``r`` comes from (seed, s, r, i), so a resumed run draws the
same noise as an uninterrupted one (and N = 1 the noise it always drew).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import torch

from data import ShardedBatches, augment
from engine import metrics_log
from engine.checkpoint import TrainingState, checkpoint_path
from engine.checkpoint_store import CheckpointStore, clean_temp_files
from engine.config import save_config
from engine.compile import compile_forward
from engine.cpu_malloc import apply_cpu_malloc
from engine.ema import EMA
from common.errors import FlowlabError
from engine.evaluate import seeded
from engine.finite_step import guarded_update, keep_step_on_device
from engine.run_lock import RunLock
from engine.schedule import learning_rate
from engine.sections import RunConfig
from engine.setup import count_parameters, load_data, make_model, make_objective, make_optimizer
from models.core.activation_memory import set_activation_memory


def _step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """The torch seed of micro-batch ``micro`` of step ``step`` on ``rank`` (micro 0: the
    seed every step had before gradient accumulation)."""
    return (seed * 1_000_003 + step * 4099 + rank + micro * 2_147_483_629) % (2**63 - 1)


class Trainer:
    def __init__(self, cfg: RunConfig | dict, run_dir: str, resume: TrainingState | None = None, data=None,
                 tensorboard: bool = True, objective=None):
        """``data`` (an ``ImageDataset`` or ``VectorDataset``) replaces the config's data set
        (benchmarks use this); ``objective`` the config's objective; ``resume`` continues a
        checkpointed run."""
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.cfg, self.run_dir = RunConfig.of(cfg), run_dir
        t = self.cfg.train
        ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.acc = Accelerator(mixed_precision=t.mixed_precision, kwargs_handlers=[ddp_kwargs])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if t.grad_accum_steps < 1:
            raise FlowlabError(f"train.grad_accum_steps must be at least 1, got {t.grad_accum_steps}")
        if t.batch_size % (self.world * t.grad_accum_steps):
            raise FlowlabError(f"train.batch_size={t.batch_size} is not divisible by {self.world} process(es) x "
                               f"train.grad_accum_steps={t.grad_accum_steps}")
        self.micro_batch_size = t.batch_size // (self.world * t.grad_accum_steps)
        # before the model and data take their memory; process-wide (engine/cpu_malloc.py)
        self.cpu_malloc = apply_cpu_malloc(t.cpu_malloc) if self.acc.device.type == "cpu" else "not a CPU run"
        torch.manual_seed(t.seed)
        self.data = data if data is not None else load_data(self.cfg)
        self.model = make_model(self.cfg, self.data.shape, self.data.n_bits)
        self.memory_plan = set_activation_memory(self.model, t.activation_memory)  # names and weights unchanged
        self.objective = objective if objective is not None else make_objective(self.cfg)
        self.objective.check(self.data, self.model)
        self.step, self.images_seen, self.nonfinite_total = 0, 0, 0
        if resume is not None:
            resume.restore(model=self.model)
        self.model.to(self.acc.device)
        if resume is None:
            self._data_init()
        self.optimizer = make_optimizer(self.cfg, self.model.parameters())
        self.ema = EMA(self.model, t.ema).to(self.acc.device) if t.ema > 0 else None
        if resume is not None:
            resume.restore(optimizer=self.optimizer, ema=self.ema)
            self.step, self.images_seen, self.nonfinite_total = resume.step, resume.images_seen, resume.nonfinite_total
        compile_forward(self.model, t.compile, t.compile_backend, what=f"model '{self.cfg.model['name']}'",
                        log=self.log, family=self.cfg.model["name"], activation_memory=t.activation_memory)
        self.wrapped, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        keep_step_on_device(self.optimizer, self.acc.device)
        # How a non-finite step is kept out: "mask" keeps the update only where the device flag is
        # true (no host read: a GPU's queue never drains mid-step); "host" reads the flag and skips
        # the update. On a CPU the read costs nothing and the mask's copy of the weights and moments
        # (3-4x the parameters each step) would, so the CPU reads it.  Same guarantee either way.
        self.finite_guard = "mask" if self.acc.device.type == "cuda" else "host"
        self._pending = []  # (step, metrics, finite flag) of the steps taken since the flags were last read
        self._last_good = None  # metrics of the last finite step among the last ones read
        # no data set (energy fits): the objective draws each batch itself (``_batch``)
        self.batches = (None if self.data.train is None else
                        ShardedBatches(self.data.train.shape[0], t.batch_size, t.seed, self.rank, self.world))
        self.writer = None
        if self.acc.is_main_process and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        self._init_checkpointing(resume)

    # --- set-up ----------------------------------------------------------------------
    def _data_init(self) -> None:
        """Data-dependent init on one seeded batch, on the device, identical on every rank, before wrapping
        (without a data set: a batch the objective draws)."""
        t = self.cfg.train
        g = torch.Generator().manual_seed(t.seed)
        if self.data.train is None:
            x = self.objective.draw_batch(self.model, t.init_batch_size, g).to(self.acc.device)
        else:
            n = min(t.init_batch_size, self.data.train.shape[0])
            x = self.data.train[torch.randperm(self.data.train.shape[0], generator=g)[:n]].to(self.acc.device)
        with seeded(t.seed, self.acc.device):
            self.model.data_init(x)

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    # --- one step --------------------------------------------------------------------------
    def _batch(self, step: int) -> torch.Tensor:
        """This rank's share of the global batch of ``step`` (augmented images, on the device);
        without a data set the objective draws it from (seed, step, rank)."""
        if self.data.train is None:
            g = torch.Generator().manual_seed(_step_seed(self.cfg.train.seed, step, self.rank))
            return self._to_device(self.objective.draw_batch(self.model, self.cfg.train.batch_size // self.world, g))
        indices = self.batches.indices(step)
        x = self.data.train[indices]
        d = self.cfg.data
        if self.data.kind == "image" and (d.hflip or d.translate > 0):
            g = torch.Generator().manual_seed(_step_seed(self.cfg.train.seed, step, self.rank))
            x = augment(x, d.hflip, d.translate, g)
        x = self._to_device(x)
        # a labelled objective (bnn) takes the batch with its labels (engine.objective_bnn.LabelledBatch)
        return self.objective.with_labels(x, self.data, indices) if getattr(self.objective, "labelled", False) else x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host batch on the device; to a GPU from pinned memory without blocking (a copy
        from pageable memory waits for the GPU's queue: a host synchronisation every step)."""
        if self.acc.device.type != "cuda" or x.device.type != "cpu":
            return x.to(self.acc.device)
        return x.pin_memory().to(self.acc.device, non_blocking=True)

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:  # nothing to agree on: no device tensor, no host synchronisation
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def accumulate_gradients(self, step: int) -> tuple[dict, torch.Tensor]:
        """Forward and backward over this rank's micro-batches of ``step``, gradients summed
        as (1/N) sum_i grad loss_i, all-reduced over ranks once (with the last backward).

        Returns the logs averaged over the micro-batches and the 0-dim device flag "every loss
        and gradient of this step is finite on every rank", read by nobody on the host here.
        A non-finite loss is folded into the gradients: its backward runs on ``loss * NaN``, so
        the all-reduced gradients, and with them the gradient norm every rank computes, are
        non-finite everywhere (no extra collective, no host read)."""
        t = self.cfg.train
        x = self._batch(step)
        self._last_batch = x
        micro = x.split(self.micro_batch_size)
        n, totals = len(micro), {}
        for i, xi in enumerate(micro):
            last = i == n - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.wrapped):
                torch.manual_seed(_step_seed(t.seed, step, self.rank, i))
                with self.acc.autocast():
                    loss, logs = self.objective(self.wrapped, xi)
                poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
                self.acc.backward(loss * poison if n == 1 else loss * (poison / n))
            totals = logs if i == 0 else {k: totals[k] + v for k, v in logs.items()}
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        totals = totals if n == 1 else {k: v / n for k, v in totals.items()}
        return {**totals, "grad_norm": grad_norm.detach()}, torch.isfinite(grad_norm.detach())

    def device_step(self, step: int) -> tuple[dict, torch.Tensor]:
        """One optimizer step without host synchronisation: (metrics, ``finite``), ``finite`` a
        0-dim device flag.  A non-finite step changes nothing (``engine.finite_step``: weights,
        optimizer moments and step count, EMA and buffers keep their values bit for bit); the
        trainer reads the flags where it logs (``_settle``)."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_scale * learning_rate(step, t.lr, t.warmup_steps, t.steps, t.schedule,
                                                        t.decay_rate, t.decay_every_steps)
        self.objective.start_step(step)
        logs, finite = self.accumulate_gradients(step)

        def update():
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.model.after_optimizer_step()

        if self.finite_guard == "mask":
            guarded_update(finite, update, self.optimizer, self.model, self.ema)
        elif bool(finite):  # every rank holds the same flag: the gradients it is read from are all-reduced
            update()
        self.optimizer.zero_grad(set_to_none=True)
        return {**logs, "lr": self.optimizer.param_groups[0]["lr"]}, finite

    def train_step(self, step: int) -> dict | None:
        """One optimizer step; returns its metrics, or None if it was skipped as non-finite
        (reads the flag on the host: ``fit`` uses ``device_step`` and reads it where it logs)."""
        metrics, finite = self.device_step(step)
        return metrics if bool(finite) else None

    def record_layer_stats(self) -> None:
        """Per-layer log-det and output statistics of this rank's last batch, and every layer's
        own diagnostics, under ``layers/`` (the view to read when a run starts to diverge)."""
        diagnostics = self.model.diagnostics()  # of the training step, before the pass below
        with seeded(self.cfg.train.seed, self.acc.device), self._eval_mode():  # leaves the training stream untouched
            stats = self.model.layer_stats(self._last_batch)
        for name, value in {**stats, **diagnostics}.items():
            self._record(f"layers/{name}", value)

    @contextlib.contextmanager
    def _eval_mode(self):
        """The model in eval mode (batch norm on running statistics, no dropout) for a side pass."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    # --- evaluation, samples, checkpoints ------------------------------------------------
    def _eval_model(self):
        """Context: the model with EMA weights swapped in when EMA is on."""
        return self.ema.swapped_in(self.model) if self.ema is not None else contextlib.nullcontext(self.model)

    def evaluate(self) -> dict:
        """The objective's test numbers (``objective.evaluate``: bits/dim for images, NLL for
        vectors, -ELBO and IS -log p(x) for the VAE, reverse KL on fresh samples), each
        recorded as ``test/<name>``; all ranks must call it."""
        with self._eval_model() as model:
            result = self.objective.evaluate(model, self.data, self.cfg.eval, self.acc, seed=self.cfg.train.seed)
        for name, value in result["metrics"].items():
            self._record(f"test/{name}", value)
        self.log(f"step {self.step}: test {result['line']} (n={result['n']}, EMA={'on' if self.ema else 'off'})")
        return result

    def save_samples(self) -> str | None:
        """What the objective draws (``objective.save_samples``: a PNG grid per temperature for
        images, the density / samples figure for 2-D vectors) into ``samples/step_N.png``."""
        if not self.acc.is_main_process:
            return None
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        stem = os.path.join(self.run_dir, "samples", f"step_{self.step:07d}")
        # under the run's autocast: bf16 conditioners for a bf16 run, as its evaluation and sample.py
        with self._eval_model() as model, torch.random.fork_rng(devices=[]), self.acc.autocast():
            torch.manual_seed(self.cfg.train.seed)
            model.eval()
            out = self.objective.save_samples(model, self.data, self.cfg.sample, stem)
            model.train()
        path, bad, what = out["path"], out["nonfinite"], out["nonfinite_what"]
        if self.writer is not None and out.get("tb_image") is not None:
            self.writer.add_image("samples", out["tb_image"], self.images_seen)
        if bad:
            self.log(f"warning: {bad} non-finite sample {what} at step {self.step} ({out['nonfinite_note']} in {path})")
        self._record(f"samples/nonfinite_{what}", bad)
        return path

    # --- checkpoints and non-finite steps --------------------------------------------------
    def _init_checkpointing(self, resume: TrainingState | None) -> None:
        t = self.cfg.train
        self.store = CheckpointStore(self.run_dir, t.keep_checkpoints, t.keep_best)
        self.lr_scale = resume.lr_scale if resume is not None else 1.0   # lowered by each rollback
        self.rollbacks = resume.rollbacks if resume is not None else 0
        self.nonfinite_streak = 0  # consecutive skipped steps up to now

    def _state_is_finite(self) -> bool:
        """Whether every weight, buffer and averaged weight is finite on every rank."""
        tensors = list(self.model.state_dict().values()) + (list(self.ema.shadow.values()) if self.ema else [])
        return not self._any_rank(not all(bool(torch.isfinite(v).all()) for v in tensors if v.is_floating_point()))

    def _next_step_is_finite(self) -> bool:
        """Whether the next training step from this state would be taken (finite loss and
        gradient on its batch); weights, buffers, random streams and gradients are left as they were."""
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        last_batch = getattr(self, "_last_batch", None)
        devices = [self.acc.device.index or 0] if self.acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            finite = bool(self.accumulate_gradients(self.step)[1])
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        self._last_batch = last_batch
        return finite

    def _checkpoint_problem(self) -> str | None:
        """Why the current state must not be checkpointed, or None (all ranks call it)."""
        if self.nonfinite_streak:
            return f"the run is in a non-finite streak ({self.nonfinite_streak} skipped step(s))"
        if not self._state_is_finite():
            return "its weights are not finite"
        if not self._next_step_is_finite():
            return "its weights give a non-finite loss or gradient on the next batch"
        return None

    def _kept(self) -> str:
        step = self.store.latest_step
        if step is None:
            return "no checkpoint has been written yet"
        return f"the last good checkpoint (step {step}, {self.store.latest_path}) is kept"

    def save(self, test_bpd: float | None = None, latest: bool = True) -> bool:
        """Checkpoint the current state from the main process, atomically, if it is good (see
        ``_checkpoint_problem``): as the latest checkpoint (``latest``) and, when ``test_bpd``
        (this state's test bits/dim) is the best so far, as ``best.pt``.  Returns whether it was
        written; a refused state is one warning and the last good checkpoint stays as it is."""
        best = self.store.improves_best(test_bpd)
        if not (latest or best):
            return False
        self.acc.wait_for_everyone()
        problem = self._checkpoint_problem()
        if problem is not None:
            self.log(f"warning: no checkpoint at step {self.step}: {problem}; {self._kept()}")
            return False
        if self.acc.is_main_process:
            state = TrainingState.capture(self.cfg.to_dict(), self.model, self.optimizer, self.ema, step=self.step,
                                          images_seen=self.images_seen, nonfinite_total=self.nonfinite_total,
                                          world_size=self.world, data_shape=self.data.shape, lr_scale=self.lr_scale,
                                          rollbacks=self.rollbacks, test_bpd=test_bpd)
            if latest:
                self.store.commit(state, best=best)
            else:
                self.store.commit_best(state)
        else:
            self.store.note(step=self.step if latest else None, best_bpd=test_bpd if best else None)
        self.acc.wait_for_everyone()
        return True

    def _roll_back_or_stop(self) -> None:
        """``train.max_nonfinite`` consecutive skipped steps: roll back to the last good
        checkpoint with the learning rate times ``train.rollback_lr_factor`` (at most
        ``train.nonfinite_rollback`` times), else stop with a one-line error."""
        t = self.cfg.train
        if self.rollbacks >= t.nonfinite_rollback or self.store.latest_step is None:
            self._stop_nonfinite()
        state = self.store.latest()
        state.restore(model=self.model, optimizer=self.optimizer, ema=self.ema)
        keep_step_on_device(self.optimizer, self.acc.device)
        skipped_at = self.step
        self.step, self.images_seen = state.step, state.images_seen
        self.rollbacks += 1
        self.lr_scale *= t.rollback_lr_factor
        self.nonfinite_streak = 0
        if self.acc.is_main_process:
            metrics_log.truncate(self.run_dir, self.step, moved_to=metrics_log.ROLLED_BACK_NAME)
        self.log(f"warning: {t.max_nonfinite} consecutive non-finite steps at step {skipped_at}: rolled back to the "
                 f"last good checkpoint (step {self.step}) with the learning rate x{self.lr_scale:g} "
                 f"(rollback {self.rollbacks} of {t.nonfinite_rollback}; the rows after step {self.step} moved to "
                 f"{metrics_log.ROLLED_BACK_NAME})")

    def _record(self, name: str, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, self.images_seen)
        if self.acc.is_main_process:
            metrics_log.append(self.run_dir, {"step": self.step, "images_seen": self.images_seen, name: value})

    # --- the loop ----------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        self.log(f"data: {self.data.source}")
        accum = (f" = {t.grad_accum_steps} micro-batches of {self.micro_batch_size} per process"
                 if t.grad_accum_steps > 1 else "")
        self.log(f"model: {self.cfg.model['name']}, {count_parameters(self.model):,} parameters; "
                 f"{self.world} process(es) on {self.acc.device}; global batch {t.batch_size}{accum}")
        if t.activation_memory != "store":
            self.log(f"activation memory ({t.activation_memory}): " + "; ".join(self.memory_plan))
        if self.step == 0 and t.eval_every > 0:
            self.evaluate()
        bar = self._bar = tqdm(total=t.steps, initial=self.step, disable=not self.acc.is_main_process, dynamic_ncols=True)
        window_start, window_images, last = time.perf_counter(), 0, None
        deadline = None if t.time_limit_minutes is None else time.perf_counter() + 60 * t.time_limit_minutes
        done = self.step >= t.steps
        while not done:
            self._pending.append((self.step, *self.device_step(self.step)))
            settled = self._settle_due(deadline)
            if settled:
                if self._settle():  # a rollback: continue from its step
                    bar.n, last, window_start, window_images = self.step, None, time.perf_counter(), 0
                    bar.refresh()
                    continue
                last = self._last_good if self._last_good is not None else last
            self.step += 1
            self.images_seen += t.batch_size
            window_images += t.batch_size
            log_now = self.step % t.log_every == 0 or self.step >= t.steps
            if log_now and self.nonfinite_streak:  # never the last finite values as if current
                self._record("train/nonfinite_steps", self.nonfinite_total)
                self._record("train/nonfinite_streak", self.nonfinite_streak)
                window_start, window_images = time.perf_counter(), 0
            elif log_now and last is not None:
                elapsed = time.perf_counter() - window_start
                main = self.objective.metric  # bpd, nll, nelbo, reverse_kl
                value = self.acc.reduce(last[main].reshape(1).float(), reduction="mean").item()
                img_s = window_images / max(elapsed, 1e-9)
                for name, v in [(f"train/{main}", value), ("train/lr", last["lr"]), ("train/grad_norm", float(last["grad_norm"])),
                                ("train/img_per_s", img_s), ("train/nonfinite_steps", self.nonfinite_total)]:
                    self._record(name, v)
                for name in (k for k in last if k not in (main, "lr", "grad_norm")):  # the objective's other logs:
                    # weighted auxiliary losses (RNODE, ...), the ELBO's terms, beta
                    self._record(f"train/{name}", self.acc.reduce(last[name].reshape(1).float(), reduction="mean").item())
                for name, v in self.model.diagnostics_summary().items():
                    self._record(f"diag/{name}", v)
                bar.set_postfix(**{main: f"{value:.3f}"}, img_s=f"{img_s:.1f}")
                window_start, window_images = time.perf_counter(), 0
            if t.layer_stats_every > 0 and self.step % t.layer_stats_every == 0:
                self.record_layer_stats()
            bar.update(1)
            done = self.step >= t.steps or (settled and deadline is not None and self._any_rank(time.perf_counter() > deadline))
            if done and self.step < t.steps:
                self.log(f"time limit of {t.time_limit_minutes} min reached at step {self.step}")
            test_bpd = None
            if t.eval_every > 0 and (self.step % t.eval_every == 0 or done):
                test_bpd = (self.evaluate() or {}).get("bpd")
            if t.sample_every > 0 and (self.step % t.sample_every == 0 or done):
                self.save_samples()
            scheduled = (t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0) or done
            if scheduled or test_bpd is not None:
                self.save(test_bpd, latest=scheduled)
            if window_images == 0:  # img/s counts training time only, not eval/sampling/saving
                window_start = time.perf_counter()
        bar.close()
        return self._finish()

    def _settle_due(self, deadline: float | None) -> bool:
        """Whether the step just taken must read the finite flags of the steps since the last
        read: before anything that logs or needs the streak (a log point, layer statistics,
        evaluation, samples, a checkpoint, the last step, the time limit), and before the
        unread steps alone could make a streak of ``train.max_nonfinite``, so that a stop or a
        rollback happens at the very step it did when every step was read."""
        t, nxt = self.cfg.train, self.step + 1
        every = [t.log_every, t.layer_stats_every, t.eval_every, t.sample_every, t.checkpoint_every]
        return (nxt >= t.steps or any(n > 0 and nxt % n == 0 for n in every)
                or self.nonfinite_streak + len(self._pending) >= t.max_nonfinite
                or (deadline is not None and self.world == 1 and time.perf_counter() > deadline))

    def _settle(self) -> bool:
        """Read the finite flags of the pending steps (one host read) and account for them in
        order, as if each had been read at its step: counts, streak, warnings, the last good
        metrics (``_last_good``); a streak of ``train.max_nonfinite`` at the last one rolls back
        (returns True) or stops."""
        t, pending, self._pending = self.cfg.train, self._pending, []
        flags = torch.stack([finite for _, _, finite in pending]).tolist()
        self._last_good = None
        for (step, metrics, _), finite in zip(pending, flags):
            if finite:
                self.nonfinite_streak, self._last_good = 0, metrics
                continue
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            self.log(f"warning: non-finite loss or gradient at step {step}; step skipped ({self.nonfinite_total} so far)")
            self._bar.set_postfix(bpd="non-finite", streak=self.nonfinite_streak)
            if self.nonfinite_streak >= t.max_nonfinite:
                self._roll_back_or_stop()  # returns only after a rollback
                self._last_good = None
                return True
        return False

    def _stop_nonfinite(self) -> None:
        x = self._batch(self.step)
        where = self.model.find_nonfinite(x) if hasattr(self.model, "find_nonfinite") else None
        after = f" after {self.rollbacks} rollback(s)" if self.rollbacks else ""
        if getattr(self, "_bar", None) is not None:
            self._bar.close()  # the error line then starts on a line of its own
        raise FlowlabError(
            f"training stopped: {self.cfg.train.max_nonfinite} consecutive non-finite steps at step {self.step}{after}; "
            f"first non-finite layer: {where or 'none found on this batch (check the learning rate)'}; "
            f"{self._kept()}")

    def _finish(self) -> dict:
        """Summary of the run, with a parameter checksum from every rank (they must agree)."""
        from accelerate.utils import gather_object

        checksum = float(sum(p.detach().double().sum().item() for p in self.model.parameters()))
        checksums = gather_object([checksum])
        summary = {"world_size": self.world, "step": self.step, "images_seen": self.images_seen,
                   "nonfinite_steps": self.nonfinite_total, "param_checksums": checksums,
                   "num_params": count_parameters(self.model), "data": self.data.source}
        if self.acc.is_main_process:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            if self.writer is not None:
                self.writer.close()
        return summary


def prepare_run_dir(run_dir: str, cfg: RunConfig | dict, resume: bool) -> TrainingState | None:
    """Check the run directory; returns the checkpoint's state when resuming."""
    ckpt = checkpoint_path(run_dir)
    if resume:
        state = TrainingState.load(ckpt)
        section = RunConfig.from_resolved(state.config).run_difference(RunConfig.of(cfg))
        if section is not None:
            raise FlowlabError(f"cannot resume {run_dir}: its {section} config differs from the one given")
        return state
    if os.path.exists(ckpt):
        raise FlowlabError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    return None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _make_run_dir(run_dir: str) -> None:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise FlowlabError(f"--out {run_dir} is a file, not a run directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise FlowlabError(f"cannot create run directory {run_dir}: {e.strerror}") from None


def _tidy_run_dir(run_dir: str, state: TrainingState | None) -> None:
    """Main process, under the lock: remove temporary files of a killed checkpoint write and the
    metrics rows after the step the run continues from (all of them for a fresh run)."""
    removed = clean_temp_files(run_dir)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left by an interrupted checkpoint write in {run_dir}",
              flush=True)
    step = -1 if state is None else state.step
    dropped = metrics_log.truncate(run_dir, step)
    if dropped:
        what = f"after step {step}, the checkpoint resumed" if state is not None else "of an earlier run that left no checkpoint"
        print(f"note: dropped {dropped} row(s) of {metrics_log.METRICS_NAME} {what}", flush=True)


def _world_size_note(state: TrainingState, trainer: "Trainer") -> str | None:
    if state.world_size is None or state.world_size == trainer.world:
        return None
    t = trainer.cfg.train
    return (f"note: the checkpoint was written by {state.world_size} process(es), resuming on {trainer.world}: the same run, "
            f"since train.batch_size={t.batch_size} is the global batch and the batches, schedule and step count depend "
            f"only on the step (now {trainer.micro_batch_size} images per process and micro-batch); per-process noise "
            f"draws and float rounding differ from an uninterrupted run")


def run_training(cfg: RunConfig | dict, run_dir: str, resume: bool = False) -> dict:
    """Train (or, with ``resume``, continue: the checkpoint's model, data and objective with
    the given train, eval and sample sections) into ``run_dir``, holding its lock throughout
    (a second run on it is a one-line error; a stale lock of a killed run is taken over)."""
    cfg = RunConfig.of(cfg)
    _make_run_dir(run_dir)
    lock = RunLock(run_dir).acquire() if is_main_process() else None
    try:
        if lock is not None and lock.stale_message():
            print(lock.stale_message(), flush=True)
        state = prepare_run_dir(run_dir, cfg, resume)
        if state is not None:
            cfg = dataclasses.replace(RunConfig.from_resolved(state.config), train=cfg.train, eval=cfg.eval,
                                      sample=cfg.sample)
        if is_main_process():
            _tidy_run_dir(run_dir, state)
            save_config(cfg.to_dict(), os.path.join(run_dir, "config.yaml"))
        trainer = Trainer(cfg, run_dir, state)
        note = None if state is None else _world_size_note(state, trainer)
        if note:
            trainer.log(note)
        finished = False
        try:
            summary = trainer.fit()
            finished = True
            return summary
        finally:
            # tear the process group down explicitly, every rank at once and after the DDP wrapper
            # (which holds the group) is gone: left to interpreter exit, the collective backend's
            # threads can abort a process (SIGABRT, "terminate called") after a finished run
            if finished:  # (after an error the other ranks may never reach a barrier)
                trainer.acc.wait_for_everyone()
            trainer.wrapped = None
            trainer.acc.free_memory()
            trainer.acc.end_training()
    finally:
        if lock is not None:
            lock.release()
