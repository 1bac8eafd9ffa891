"""Checkpoints: written atomically, carrying the resolved config, read with clear errors.

A checkpoint is one file, ``RUN_DIR/checkpoint.pt``: a dict (format version 1) with
``config`` (the resolved config), ``model`` (state dict), ``ema`` (``EMA.state_dict()``
or None), ``optimizer``, ``step``, ``images_seen``, ``nonfinite_total``, ``world_size``,
``data_shape`` and ``num_params``.  :class:`TrainingState` is that dict, typed, and the
only code that knows its fields: ``capture`` takes it from a live run, ``restore`` puts it
back into a model / optimizer / EMA, ``save`` and ``load`` write and read the file.  It is
written to a temporary file in the same folder, flushed to disk and renamed over the old
one, so a crash mid-write never leaves a half-written checkpoint and the last good one
survives.  ``load_checkpoint`` is the one place a checkpoint file is read.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import torch

from common.errors import FlowlabError
from engine.config import resolve

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_NAME)


def save_checkpoint(state: dict, path: str) -> None:
    """Atomically write ``state`` to ``path``."""
    state = {"format_version": FORMAT_VERSION, **state}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint file as its dict; missing, corrupt or foreign files raise one-line errors."""
    if not os.path.isfile(path):
        raise FlowlabError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise FlowlabError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise FlowlabError(f"{path} is not a flowlab checkpoint (format {FORMAT_VERSION})")
    if isinstance(state.get("config"), dict):
        state["config"] = resolve(state["config"])
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    """Load weights strictly; a checkpoint of another architecture is a one-line error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise FlowlabError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def _cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    return tree


@dataclasses.dataclass
class TrainingState:
    """Everything a run needs to continue: the checkpoint's fields.

    ``config`` is the resolved config dict (read back through ``engine.config.resolve``, so
    a checkpoint written before a key was added gets its default); ``ema`` is the EMA's own
    ``state_dict()``.  Fields a format-1 checkpoint may lack default as they did before."""

    config: dict
    model: dict
    optimizer: dict | None = None
    ema: dict | None = None
    step: int = 0
    images_seen: int = 0
    nonfinite_total: int = 0
    world_size: int | None = None
    data_shape: tuple[int, ...] | None = None
    num_params: int | None = None
    path: str | None = dataclasses.field(default=None, compare=False)  # where it was read from (messages)

    @classmethod
    def capture(cls, config: dict, model: torch.nn.Module, optimizer=None, ema=None, *, step: int,
                images_seen: int, nonfinite_total: int = 0, world_size: int = 1, data_shape=None) -> "TrainingState":
        """The state of a live run (tensors copied to the CPU); ``model`` unwrapped."""
        return cls(config=config, model=_cpu(model.state_dict()),
                   optimizer=None if optimizer is None else optimizer.state_dict(),
                   ema=None if ema is None else _cpu(ema.state_dict()),
                   step=step, images_seen=images_seen, nonfinite_total=nonfinite_total, world_size=world_size,
                   data_shape=None if data_shape is None else tuple(data_shape),
                   num_params=sum(p.numel() for p in model.parameters()))

    def to_dict(self) -> dict:
        """The on-disk layout (format version 1; ``save_checkpoint`` adds the version)."""
        return {"config": self.config, "model": self.model, "ema": self.ema, "optimizer": self.optimizer,
                "step": self.step, "images_seen": self.images_seen, "nonfinite_total": self.nonfinite_total,
                "world_size": self.world_size,
                "data_shape": None if self.data_shape is None else list(self.data_shape),
                "num_params": self.num_params}

    @classmethod
    def from_dict(cls, state: dict, path: str = "checkpoint") -> "TrainingState":
        """A checkpoint dict (as ``load_checkpoint`` returns it) as a TrainingState."""
        if not isinstance(state.get("config"), dict) or not isinstance(state.get("model"), dict):
            raise FlowlabError(f"{path} is not a flowlab checkpoint (no config or model weights)")
        shape = state.get("data_shape")
        return cls(config=resolve(state["config"]), model=state["model"], optimizer=state.get("optimizer"),
                   ema=state.get("ema"), step=state.get("step", 0), images_seen=state.get("images_seen", 0),
                   nonfinite_total=state.get("nonfinite_total", 0), world_size=state.get("world_size"),
                   data_shape=None if shape is None else tuple(shape), num_params=state.get("num_params"),
                   path=path)

    @classmethod
    def load(cls, path: str) -> "TrainingState":
        return cls.from_dict(load_checkpoint(path), path)

    def save(self, path: str) -> None:
        save_checkpoint(self.to_dict(), path)

    def restore(self, model: torch.nn.Module | None = None, optimizer=None, ema=None) -> None:
        """Load the saved weights into ``model`` (strictly: another architecture is a one-line
        error), the optimizer state into ``optimizer`` and the averaged weights into ``ema``
        (when the checkpoint has them; an EMA the run did not keep stays as built)."""
        where = self.path or "checkpoint"
        if model is not None:
            load_model_state(model, self.model, where)
        if optimizer is not None:
            if self.optimizer is None:
                raise FlowlabError(f"{where} holds no optimizer state to resume from")
            optimizer.load_state_dict(self.optimizer)
        if ema is not None and self.ema is not None:
            ema.load_state_dict(self.ema)
