"""Loading a finished or running run directory for sampling and evaluation."""
from __future__ import annotations

import os

import torch

from engine.checkpoint import checkpoint_path, load_checkpoint, load_model_state
from engine.config import resolve
from common.errors import FlowlabError
from engine.setup import make_model


def load_run(run_dir: str, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(resolved config, model in eval mode, checkpoint info) of a run directory.

    The model is rebuilt from the config the checkpoint carries and loaded with its
    EMA weights when the run kept an EMA and ``use_ema`` is set.
    """
    if not os.path.isdir(run_dir):
        raise FlowlabError(f"run directory not found: {run_dir}")
    state = load_checkpoint(checkpoint_path(run_dir))
    cfg = resolve(state["config"])
    model = make_model(cfg, _data_shape(cfg, state), cfg["data"]["n_bits"])
    weights = state["model"]
    ema = state.get("ema")
    if use_ema and ema is not None:
        weights = {k: v.to(state["model"][k].dtype) for k, v in ema["shadow"].items()}
    load_model_state(model, weights, checkpoint_path(run_dir))
    info = {"step": state["step"], "images_seen": state["images_seen"], "ema": use_ema and ema is not None,
            "num_params": state.get("num_params")}
    return cfg, model.to(device).eval(), info


def _data_shape(cfg: dict, state: dict):
    """The data shape the model was built for (stored with its config by the trainer)."""
    shape = state.get("data_shape")
    if shape is None:
        raise FlowlabError("checkpoint does not record the data shape it was trained on")
    return tuple(shape)
