"""The model-agnostic trainer, on HF accelerate.

It knows ``model(x, return_aux=True) -> (log p(x) (B,), auxiliary losses)`` and the hooks of
``models.core.flow`` (which gathers them from the layers), and calls them unconditionally.
One process, several GPUs or several nodes: start it with ``accelerate launch``.

Per step: global batch ``train.batch_size`` split over processes; loss = mean bits/dim
(+ auxiliary losses); non-finite losses or gradients skip the step on every rank
together; gradient clipping; optimizer step; EMA; after-step hooks.  Progress is
counted in images seen.  All randomness of step ``s`` on rank ``r`` comes from
(seed, s, r), so a resumed run draws the same noise as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from data import ShardedBatches, augment
from engine.checkpoint import checkpoint_path, load_checkpoint, load_model_state, save_checkpoint
from engine.config import save_config
from engine.ema import EMA
from common.errors import FlowlabError
from engine.evaluate import evaluate_bpd, seeded
from engine.images import grid_layout, save_grid, to_uint8
from engine.metrics import bits_per_dim
from engine.schedule import learning_rate
from engine.setup import count_parameters, load_data, make_model, make_optimizer


def auxiliary_totals(aux: dict) -> dict:
    """Auxiliary losses summed by their own name over layers ("transforms.3.kinetic_energy"
    and "transforms.5.kinetic_energy" -> "kinetic_energy"), detached for logging."""
    out = {}
    for name, value in aux.items():
        key = name.rsplit(".", 1)[-1]
        out[key] = out.get(key, 0.0) + value.detach().float()
    return out


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 4099 + rank) % (2**63 - 1)


class Trainer:
    def __init__(self, cfg: dict, run_dir: str, resume_state: dict | None = None, data=None, tensorboard: bool = True):
        """``data`` (an ``ImageDataset``) replaces the config's data set (benchmarks use this)."""
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.cfg, self.run_dir, self.t = cfg, run_dir, cfg["train"]
        ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.acc = Accelerator(mixed_precision=self.t["mixed_precision"], kwargs_handlers=[ddp_kwargs])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if self.t["batch_size"] % self.world:
            raise FlowlabError(f"train.batch_size={self.t['batch_size']} is not divisible by {self.world} processes")
        torch.manual_seed(self.t["seed"])
        self.data = data if data is not None else load_data(cfg)
        self.model = make_model(cfg, self.data.shape, self.data.n_bits)
        self.num_dims = self.model.num_dims
        self.step, self.images_seen, self.nonfinite_total = 0, 0, 0
        ckpt = checkpoint_path(run_dir)
        if resume_state is not None:
            load_model_state(self.model, resume_state["model"], ckpt)
        self.model.to(self.acc.device)
        if resume_state is None:
            self._data_init()
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.ema = EMA(self.model, self.t["ema"]) if self.t["ema"] > 0 else None
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            if self.ema is not None and resume_state.get("ema") is not None:
                self.ema.load_state_dict(resume_state["ema"])
            self.step, self.images_seen = resume_state["step"], resume_state["images_seen"]
            self.nonfinite_total = resume_state.get("nonfinite_total", 0)
        if self.ema is not None:
            self.ema.shadow = {k: v.to(self.acc.device) for k, v in self.ema.shadow.items()}
        self.wrapped, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.batches = ShardedBatches(self.data.train.shape[0], self.t["batch_size"], self.t["seed"], self.rank, self.world)
        self.writer = None
        if self.acc.is_main_process and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    # --- set-up ----------------------------------------------------------------------
    def _data_init(self) -> None:
        """Data-dependent init on one seeded batch, on the device, identical on every rank, before wrapping."""
        n = min(self.t["init_batch_size"], self.data.train.shape[0])
        g = torch.Generator().manual_seed(self.t["seed"])
        x = self.data.train[torch.randperm(self.data.train.shape[0], generator=g)[:n]].to(self.acc.device)
        with seeded(self.t["seed"], self.acc.device):
            self.model.data_init(x)

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    # --- one step --------------------------------------------------------------------------
    def _batch(self, step: int) -> torch.Tensor:
        x = self.data.train[self.batches.indices(step)]
        d = self.cfg["data"]
        if d["hflip"] or d["translate"] > 0:
            g = torch.Generator().manual_seed(_step_seed(self.t["seed"], step, self.rank))
            x = augment(x, d["hflip"], d["translate"], g)
        return x.to(self.acc.device)

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def train_step(self, step: int) -> dict | None:
        """One optimizer step; returns its metrics, or None if it was skipped as non-finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.t["lr"], self.t["warmup_steps"], self.t["steps"], self.t["schedule"],
                                        self.t["decay_rate"], self.t["decay_every_steps"])
        x = self._batch(step)
        torch.manual_seed(_step_seed(self.t["seed"], step, self.rank))
        with self.acc.autocast():
            log_prob, aux = self.wrapped(x, return_aux=True)
        bpd = bits_per_dim(log_prob, self.num_dims).mean()
        loss = bpd
        for value in aux.values():
            loss = loss + value
        self._last_batch = x
        if self._any_rank(not bool(torch.isfinite(loss))):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.acc.backward(loss)
        max_norm = self.t["grad_clip"] if self.t["grad_clip"] > 0 else float("inf")
        grad_norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.model.after_optimizer_step()
        out = {"bpd": bpd.detach(), "grad_norm": grad_norm.detach(), "lr": self.optimizer.param_groups[0]["lr"]}
        out.update({f"aux/{k}": v for k, v in auxiliary_totals(aux).items()})
        return out

    def record_layer_stats(self) -> None:
        """Per-layer log-det and output statistics of this rank's last batch, and every layer's
        own diagnostics, under ``layers/`` (the view to read when a run starts to diverge)."""
        diagnostics = self.model.diagnostics()  # of the training step, before the pass below
        with seeded(self.t["seed"], self.acc.device), self._eval_mode():  # leaves the training stream untouched
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
        test = self.data.test
        if self.cfg["eval"]["max_examples"]:
            test = test[: self.cfg["eval"]["max_examples"]]
        with self._eval_model() as model:
            result = evaluate_bpd(model, test, self.cfg["eval"]["batch_size"], self.acc, seed=self.t["seed"])
        self._record("test/bpd", result["bpd"])
        self.log(f"step {self.step}: test bpd {result['bpd']:.4f} ± {result['stderr']:.4f} (n={result['n']}, EMA={'on' if self.ema else 'off'})")
        return result

    def save_samples(self) -> str | None:
        if not self.acc.is_main_process:
            return None
        temps, n = self.cfg["sample"]["temperatures"], self.cfg["sample"]["n"]
        per_row = grid_layout(n, len(temps))
        rows, bad = [], 0
        with self._eval_model() as model, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.t["seed"])
            model.eval()
            for temp in temps:
                images, n_bad = to_uint8(model.sample(per_row, temperature=temp), self.data.n_bits)
                rows.append(images)
                bad += n_bad
            model.train()
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        path = os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png")
        save_grid(rows, path)
        if self.writer is not None:
            from torchvision.utils import make_grid
            self.writer.add_image("samples", make_grid(torch.cat(rows), nrow=per_row), self.images_seen)
        if bad:
            self.log(f"warning: {bad} non-finite sample pixels at step {self.step} (shown black in {path})")
        self._record("samples/nonfinite_pixels", bad)
        return path

    def save(self) -> None:
        """Atomic checkpoint from the main process; never from a non-finite state."""
        self.acc.wait_for_everyone()
        if self._any_rank(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters())):
            raise FlowlabError(f"refusing to checkpoint non-finite weights at step {self.step}; the last checkpoint is kept")
        if self.acc.is_main_process:
            state = {
                "config": self.cfg,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "ema": None if self.ema is None else {"decay": self.ema.decay, "shadow": {k: v.cpu() for k, v in self.ema.shadow.items()}},
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "images_seen": self.images_seen,
                "nonfinite_total": self.nonfinite_total,
                "world_size": self.world,
                "data_shape": list(self.data.shape),
                "num_params": count_parameters(self.model),
            }
            save_checkpoint(state, checkpoint_path(self.run_dir))
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

        t = self.t
        self.log(f"data: {self.data.source}")
        self.log(f"model: {self.cfg['model']['name']}, {count_parameters(self.model):,} parameters; "
                 f"{self.world} process(es) on {self.acc.device}; global batch {t['batch_size']}")
        if self.step == 0 and t["eval_every"] > 0:
            self.evaluate()
        bar = tqdm(total=t["steps"], initial=self.step, disable=not self.acc.is_main_process, dynamic_ncols=True)
        consecutive_bad, window_start, window_images, last = 0, time.perf_counter(), 0, None
        deadline = None if t["time_limit_minutes"] is None else time.perf_counter() + 60 * t["time_limit_minutes"]
        done = self.step >= t["steps"]
        while not done:
            metrics = self.train_step(self.step)
            if metrics is None:
                self.nonfinite_total += 1
                consecutive_bad += 1
                self.log(f"warning: non-finite loss or gradient at step {self.step}; step skipped ({self.nonfinite_total} so far)")
                if consecutive_bad >= t["max_nonfinite"]:
                    self._stop_nonfinite()
            else:
                consecutive_bad, last = 0, metrics
            self.step += 1
            self.images_seen += t["batch_size"]
            window_images += t["batch_size"]
            if last is not None and (self.step % t["log_every"] == 0 or self.step >= t["steps"]):
                elapsed = time.perf_counter() - window_start
                bpd = self.acc.reduce(last["bpd"].reshape(1), reduction="mean").item()
                img_s = window_images / max(elapsed, 1e-9)
                for name, value in [("train/bpd", bpd), ("train/lr", last["lr"]), ("train/grad_norm", float(last["grad_norm"])),
                                    ("train/img_per_s", img_s), ("train/nonfinite_steps", self.nonfinite_total)]:
                    self._record(name, value)
                for name in (k for k in last if k.startswith("aux/")):  # weighted auxiliary losses (RNODE, ...)
                    self._record(f"train/{name}", self.acc.reduce(last[name].reshape(1).float(), reduction="mean").item())
                for name, value in self.model.diagnostics_summary().items():
                    self._record(f"diag/{name}", value)
                bar.set_postfix(bpd=f"{bpd:.3f}", img_s=f"{img_s:.1f}")
                window_start, window_images = time.perf_counter(), 0
            if t["layer_stats_every"] > 0 and self.step % t["layer_stats_every"] == 0:
                self.record_layer_stats()
            bar.update(1)
            done = self.step >= t["steps"] or (deadline is not None and self._any_rank(time.perf_counter() > deadline))
            if done and self.step < t["steps"]:
                self.log(f"time limit of {t['time_limit_minutes']} min reached at step {self.step}")
            if t["eval_every"] > 0 and (self.step % t["eval_every"] == 0 or done):
                self.evaluate()
            if t["sample_every"] > 0 and (self.step % t["sample_every"] == 0 or done):
                self.save_samples()
            if (t["checkpoint_every"] > 0 and self.step % t["checkpoint_every"] == 0) or done:
                self.save()
            if window_images == 0:  # img/s counts training time only, not eval/sampling/saving
                window_start = time.perf_counter()
        bar.close()
        return self._finish()

    def _stop_nonfinite(self) -> None:
        x = self._batch(self.step)
        where = self.model.find_nonfinite(x) if hasattr(self.model, "find_nonfinite") else None
        raise FlowlabError(
            f"training stopped: {self.t['max_nonfinite']} consecutive non-finite steps at step {self.step}; "
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


def prepare_run_dir(run_dir: str, cfg: dict, resume: bool) -> dict | None:
    """Create or check the run directory; returns the checkpoint state when resuming."""
    ckpt = checkpoint_path(run_dir)
    if resume:
        state = load_checkpoint(ckpt)
        for section in ("model", "dequantizer", "data"):
            if state["config"][section] != cfg[section]:
                raise FlowlabError(f"cannot resume {run_dir}: its {section} config differs from the one given")
        return state
    if os.path.exists(ckpt):
        raise FlowlabError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    return None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_training(cfg: dict, run_dir: str, resume: bool = False) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    state = prepare_run_dir(run_dir, cfg, resume)
    if state is not None:
        cfg = {**state["config"], "train": cfg["train"], "eval": cfg["eval"], "sample": cfg["sample"]}
    if is_main_process():
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    trainer = Trainer(cfg, run_dir, state)
    try:
        return trainer.fit()
    finally:
        # tear the process group down explicitly: left to interpreter exit, the collective
        # backend's threads can abort the process (SIGABRT) after a finished run
        trainer.acc.end_training()
