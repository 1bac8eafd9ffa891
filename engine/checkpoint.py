"""Checkpoints: written atomically, carrying the resolved config, read with clear errors.

A checkpoint is one file, ``RUN_DIR/checkpoint.pt``: a dict with ``config`` (the
resolved config, read back through ``engine.config.resolve``: a config with older key
names comes back in the current ones), ``model`` (state dict), ``ema`` (or None),
``optimizer``, ``step``, ``images_seen`` and counters.  It is written to a temporary file
in the same folder, flushed to disk and renamed over the old one, so a crash mid-write
never leaves a half-written checkpoint and the last good one survives.
"""
from __future__ import annotations

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
    """Read a checkpoint; missing, corrupt or foreign files raise one-line errors."""
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
