"""Checkpoints: written atomically, carrying the resolved config, read without running code.

A checkpoint is one file (``RUN_DIR/checkpoint.pt``; ``engine.checkpoint_store`` keeps the
last K and the best beside it): the training state's fields ``config`` (the resolved
config), ``model`` (state dict), ``ema`` (``EMA.state_dict()`` or None), ``optimizer``,
``step``, ``images_seen``, ``nonfinite_total``, ``world_size``, ``data_shape``,
``num_params``, ``lr_scale`` and ``rollbacks`` (non-finite rollbacks so far) and
``test_bpd`` (when the state was evaluated).  :class:`TrainingState` is that dict, typed,
and the only code that knows its fields: ``capture`` takes it from a live run, ``restore``
puts it back into a model / optimizer / EMA, ``save`` and ``load`` write and read the file.

Format 2 (written now) is a safetensors file: the tensors, and the rest of the state as
JSON in its header (``engine.tensor_file``); loading it parses JSON and tensor bytes only,
so a checkpoint from anyone can hold data but never run code.  Format 1 (earlier code:
``torch.save`` of the same dict) is still read, with weights-only unpickling: a file that
pickles anything beyond tensors and plain containers is refused with one line.  Writes go
to a temporary file in the same folder, flushed to disk and renamed over the old one, so a
crash mid-write never leaves a half-written checkpoint.  ``load_checkpoint`` is the one
place a checkpoint file is read.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from common.errors import FlowlabError
from engine import tensor_file
from engine.config import resolve

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KIND = "training-state"
STEP_KEY, TEST_BPD_KEY = "flowlab.step", "flowlab.test_bpd"   # header entries readable without the tensors


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_NAME)


def save_checkpoint(state: dict, path: str) -> None:
    """Atomically write the checkpoint dict ``state`` to ``path`` (format 2)."""
    header = {STEP_KEY: state.get("step", 0)}
    if state.get("test_bpd") is not None:
        header[TEST_BPD_KEY] = repr(float(state["test_bpd"]))
    tensor_file.write_tree(path, {"format_version": FORMAT_VERSION, **state}, KIND, header)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint file as its dict; missing, corrupt, foreign or unsafe files raise one-line errors."""
    if not os.path.isfile(path):
        raise FlowlabError(f"no checkpoint at {path}")
    kind = tensor_file.file_format(path)
    if kind == "torch":
        state = tensor_file.read_torch_file(path)
    elif kind == "safetensors":
        state = tensor_file.read_tree(path, KIND)
    else:
        raise FlowlabError(f"checkpoint {path} is corrupt or truncated, or not a checkpoint at all")
    if not isinstance(state, dict) or state.get("format_version") not in READABLE_VERSIONS or "model" not in state:
        raise FlowlabError(f"{path} is not a flowlab checkpoint (format {' or '.join(map(str, READABLE_VERSIONS))})")
    if isinstance(state.get("config"), dict):
        try:
            state["config"] = resolve(state["config"])
        except FlowlabError as e:
            raise FlowlabError(f"checkpoint {path}: {e}") from None
    return state


def checkpoint_header(path: str) -> dict:
    """``{"step": int, "test_bpd": float | None}`` of a checkpoint, read cheaply from a format-2
    header (a format-1 file is loaded whole)."""
    if tensor_file.file_format(path) == "safetensors":
        meta = tensor_file.read_metadata(path)
        try:
            bpd = meta.get(TEST_BPD_KEY)
            return {"step": int(meta[STEP_KEY]), "test_bpd": None if bpd is None else float(bpd)}
        except (KeyError, ValueError):
            pass
    state = load_checkpoint(path)
    return {"step": state.get("step", 0), "test_bpd": state.get("test_bpd")}


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


def _field(state: dict, name: str, types, default, path: str):
    """``state[name]`` (or ``default`` when absent) checked to be of ``types``: a one-line error otherwise."""
    types = types if isinstance(types, tuple) else (types,)
    value = state.get(name, default)
    if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        raise FlowlabError(f"{path} is not a valid flowlab checkpoint: '{name}' is {value!r}")
    return value


def _tensor_dict(value, name: str, path: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise FlowlabError(f"{path} is not a valid flowlab checkpoint: '{name}' is not a dict of named tensors")
    return value


@dataclasses.dataclass
class TrainingState:
    """Everything a run needs to continue: the checkpoint's fields.

    ``config`` is the resolved config dict (read back through ``engine.config.resolve``, so
    a checkpoint written before a key was added gets its default); ``ema`` is the EMA's own
    ``state_dict()``; ``lr_scale`` multiplies the schedule's learning rate (lowered by each
    non-finite rollback, ``rollbacks`` of them so far); ``test_bpd`` is the test bits/dim of
    this state when it was evaluated.  Fields an older checkpoint lacks default as they did."""

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
    lr_scale: float = 1.0
    rollbacks: int = 0
    test_bpd: float | None = None
    path: str | None = dataclasses.field(default=None, compare=False)  # where it was read from (messages)

    @classmethod
    def capture(cls, config: dict, model: torch.nn.Module, optimizer=None, ema=None, *, step: int,
                images_seen: int, nonfinite_total: int = 0, world_size: int = 1, data_shape=None,
                lr_scale: float = 1.0, rollbacks: int = 0, test_bpd: float | None = None) -> "TrainingState":
        """The state of a live run (tensors copied to the CPU); ``model`` unwrapped."""
        return cls(config=config, model=_cpu(model.state_dict()),
                   optimizer=None if optimizer is None else optimizer.state_dict(),
                   ema=None if ema is None else _cpu(ema.state_dict()),
                   step=step, images_seen=images_seen, nonfinite_total=nonfinite_total, world_size=world_size,
                   data_shape=None if data_shape is None else tuple(data_shape),
                   num_params=sum(p.numel() for p in model.parameters()), lr_scale=float(lr_scale),
                   rollbacks=rollbacks, test_bpd=None if test_bpd is None else float(test_bpd))

    def to_dict(self) -> dict:
        """The on-disk layout (``save_checkpoint`` adds the format version)."""
        return {"config": self.config, "model": self.model, "ema": self.ema, "optimizer": self.optimizer,
                "step": self.step, "images_seen": self.images_seen, "nonfinite_total": self.nonfinite_total,
                "world_size": self.world_size,
                "data_shape": None if self.data_shape is None else list(self.data_shape),
                "num_params": self.num_params, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                "test_bpd": self.test_bpd}

    @classmethod
    def from_dict(cls, state: dict, path: str = "checkpoint") -> "TrainingState":
        """A checkpoint dict (as ``load_checkpoint`` returns it) as a TrainingState; fields of the
        wrong type are one-line errors."""
        if not isinstance(state.get("config"), dict) or not isinstance(state.get("model"), dict):
            raise FlowlabError(f"{path} is not a flowlab checkpoint (no config or model weights)")
        ema = _field(state, "ema", dict, None, path)
        if ema is not None:
            _tensor_dict(ema.get("shadow"), "ema.shadow", path)
            _field(ema, "decay", (int, float), None, path)
        shape = _field(state, "data_shape", (list, tuple), None, path)
        if shape is not None and not all(isinstance(d, int) and d > 0 for d in shape):
            raise FlowlabError(f"{path} is not a valid flowlab checkpoint: 'data_shape' is {shape!r}")
        lr_scale = _field(state, "lr_scale", (int, float), 1.0, path)
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise FlowlabError(f"{path} is not a valid flowlab checkpoint: 'lr_scale' is {lr_scale!r}")
        return cls(config=resolve(state["config"]), model=_tensor_dict(state["model"], "model", path),
                   optimizer=_field(state, "optimizer", dict, None, path), ema=ema,
                   step=_field(state, "step", int, 0, path), images_seen=_field(state, "images_seen", int, 0, path),
                   nonfinite_total=_field(state, "nonfinite_total", int, 0, path),
                   world_size=_field(state, "world_size", int, None, path),
                   data_shape=None if shape is None else tuple(shape),
                   num_params=_field(state, "num_params", int, None, path), lr_scale=float(lr_scale),
                   rollbacks=_field(state, "rollbacks", int, 0, path),
                   test_bpd=_field(state, "test_bpd", (int, float), None, path), path=path)

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
            try:
                optimizer.load_state_dict(self.optimizer)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise FlowlabError(f"{where}: its optimizer state does not fit this run's optimizer "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
        if ema is not None and self.ema is not None:
            ema.load_state_dict(self.ema)

    def weights_are_finite(self) -> bool:
        """Whether every floating-point weight (and averaged weight) is finite."""
        tensors = list(self.model.values()) + (list(self.ema["shadow"].values()) if self.ema else [])
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
