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
after-step hooks.  Progress is counted in images seen.  All randomness of micro-batch
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
from engine.checkpoint import TrainingState, checkpoint_path
from engine.config import save_config
from engine.ema import EMA
from common.errors import FlowlabError
from engine.evaluate import seeded
from engine.schedule import learning_rate
from engine.sections import RunConfig
from engine.setup import count_parameters, load_data, make_model, make_objective, make_optimizer


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
        torch.manual_seed(t.seed)
        self.data = data if data is not None else load_data(self.cfg)
        self.model = make_model(self.cfg, self.data.shape, self.data.n_bits)
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
        self.wrapped, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        # no data set (energy fits): the objective draws each batch itself (``_batch``)
        self.batches = (None if self.data.train is None else
                        ShardedBatches(self.data.train.shape[0], t.batch_size, t.seed, self.rank, self.world))
        self.writer = None
        if self.acc.is_main_process and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

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
            return self.objective.draw_batch(self.model, self.cfg.train.batch_size // self.world, g).to(self.acc.device)
        x = self.data.train[self.batches.indices(step)]
        d = self.cfg.data
        if self.data.kind == "image" and (d.hflip or d.translate > 0):
            g = torch.Generator().manual_seed(_step_seed(self.cfg.train.seed, step, self.rank))
            x = augment(x, d.hflip, d.translate, g)
        return x.to(self.acc.device)

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def accumulate_gradients(self, step: int) -> dict | None:
        """Forward and backward over this rank's micro-batches of ``step``, gradients summed
        as (1/N) sum_i grad loss_i, all-reduced over ranks once (with the last backward).

        Returns the logs averaged over the micro-batches, or None (gradients cleared) when a
        loss was not finite on any rank.  A non-finite loss skips its own backward (no
        collective runs under ``no_sync``); all ranks decide together before the last one."""
        t = self.cfg.train
        x = self._batch(step)
        self._last_batch = x
        micro = x.split(self.micro_batch_size)
        n, finite, totals = len(micro), True, {}
        for i, xi in enumerate(micro):
            last = i == n - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.wrapped):
                torch.manual_seed(_step_seed(t.seed, step, self.rank, i))
                with self.acc.autocast():
                    loss, logs = self.objective(self.wrapped, xi)
                finite = finite and bool(torch.isfinite(loss))
                if last and self._any_rank(not finite):
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                if finite:
                    self.acc.backward(loss if n == 1 else loss / n)
            totals = logs if i == 0 else {k: totals[k] + v for k, v in logs.items()}
        return totals if n == 1 else {k: v / n for k, v in totals.items()}

    def train_step(self, step: int) -> dict | None:
        """One optimizer step; returns its metrics, or None if it was skipped as non-finite."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, t.lr, t.warmup_steps, t.steps, t.schedule, t.decay_rate,
                                        t.decay_every_steps)
        self.objective.start_step(step)
        logs = self.accumulate_gradients(step)
        if logs is None:
            return None
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.model.after_optimizer_step()
        return {**logs, "grad_norm": grad_norm.detach(), "lr": self.optimizer.param_groups[0]["lr"]}

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
        with self._eval_model() as model, torch.random.fork_rng(devices=[]):
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

    def save(self) -> None:
        """Atomic checkpoint from the main process; never from a non-finite state."""
        self.acc.wait_for_everyone()
        if self._any_rank(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters())):
            raise FlowlabError(f"refusing to checkpoint non-finite weights at step {self.step}; the last checkpoint is kept")
        if self.acc.is_main_process:
            state = TrainingState.capture(self.cfg.to_dict(), self.model, self.optimizer, self.ema, step=self.step,
                                          images_seen=self.images_seen, nonfinite_total=self.nonfinite_total,
                                          world_size=self.world, data_shape=self.data.shape)
            state.save(checkpoint_path(self.run_dir))
        self.acc.wait_for_everyone()

    def _record(self, name: str, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, self.images_seen)
        if self.acc.is_main_process:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, "images_seen": self.images_seen, name: value}) + "\n")

    # --- the loop ----------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        self.log(f"data: {self.data.source}")
        accum = (f" = {t.grad_accum_steps} micro-batches of {self.micro_batch_size} per process"
                 if t.grad_accum_steps > 1 else "")
        self.log(f"model: {self.cfg.model['name']}, {count_parameters(self.model):,} parameters; "
                 f"{self.world} process(es) on {self.acc.device}; global batch {t.batch_size}{accum}")
        if self.step == 0 and t.eval_every > 0:
            self.evaluate()
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.acc.is_main_process, dynamic_ncols=True)
        consecutive_bad, window_start, window_images, last = 0, time.perf_counter(), 0, None
        deadline = None if t.time_limit_minutes is None else time.perf_counter() + 60 * t.time_limit_minutes
        done = self.step >= t.steps
        while not done:
            metrics = self.train_step(self.step)
            if metrics is None:
                self.nonfinite_total += 1
                consecutive_bad += 1
                self.log(f"warning: non-finite loss or gradient at step {self.step}; step skipped ({self.nonfinite_total} so far)")
                if consecutive_bad >= t.max_nonfinite:
                    self._stop_nonfinite()
            else:
                consecutive_bad, last = 0, metrics
            self.step += 1
            self.images_seen += t.batch_size
            window_images += t.batch_size
            if last is not None and (self.step % t.log_every == 0 or self.step >= t.steps):
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
            done = self.step >= t.steps or (deadline is not None and self._any_rank(time.perf_counter() > deadline))
            if done and self.step < t.steps:
                self.log(f"time limit of {t.time_limit_minutes} min reached at step {self.step}")
            if t.eval_every > 0 and (self.step % t.eval_every == 0 or done):
                self.evaluate()
            if t.sample_every > 0 and (self.step % t.sample_every == 0 or done):
                self.save_samples()
            if (t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0) or done:
                self.save()
            if window_images == 0:  # img/s counts training time only, not eval/sampling/saving
                window_start = time.perf_counter()
        bar.close()
        return self._finish()

    def _stop_nonfinite(self) -> None:
        x = self._batch(self.step)
        where = self.model.find_nonfinite(x) if hasattr(self.model, "find_nonfinite") else None
        raise FlowlabError(
            f"training stopped: {self.cfg.train.max_nonfinite} consecutive non-finite steps at step {self.step}; "
            f"first non-finite layer: {where or 'none found on this batch (check the learning rate)'}; "
            f"no checkpoint was written from this state")

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
    """Create or check the run directory; returns the checkpoint's state when resuming."""
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


def run_training(cfg: RunConfig | dict, run_dir: str, resume: bool = False) -> dict:
    """Train (or, with ``resume``, continue: the checkpoint's model, data and objective with
    the given train, eval and sample sections) into ``run_dir``."""
    cfg = RunConfig.of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    state = prepare_run_dir(run_dir, cfg, resume)
    if state is not None:
        cfg = dataclasses.replace(RunConfig.from_resolved(state.config), train=cfg.train, eval=cfg.eval, sample=cfg.sample)
    if is_main_process():
        save_config(cfg.to_dict(), os.path.join(run_dir, "config.yaml"))
    trainer = Trainer(cfg, run_dir, state)
    try:
        return trainer.fit()
    finally:
        # tear the process group down explicitly: left to interpreter exit, the collective
        # backend's threads can abort the process (SIGABRT) after a finished run
        trainer.acc.end_training()
