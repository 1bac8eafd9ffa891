"""Loading a finished or running run directory for sampling and evaluation."""
from __future__ import annotations

import os

import torch

from common.errors import FlowlabError
from engine.checkpoint import TrainingState, checkpoint_path
from engine.ema import EMA
from engine.sections import RunConfig
from engine.setup import make_model


def load_run(run_dir: str, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(typed config, model in eval mode, checkpoint info) of a run directory.

    The model is rebuilt from the config the checkpoint carries and loaded with its
    EMA weights when the run kept an EMA and ``use_ema`` is set.
    """
    if not os.path.isdir(run_dir):
        raise FlowlabError(f"run directory not found: {run_dir}")
    state = TrainingState.load(checkpoint_path(run_dir))
    cfg = RunConfig.from_resolved(state.config)
    if state.data_shape is None:
        raise FlowlabError("checkpoint does not record the data shape it was trained on")
    model = make_model(cfg, state.data_shape, cfg.data.n_bits)
    state.restore(model=model)
    with_ema = use_ema and state.ema is not None
    if with_ema:
        ema = EMA(model, 0.0)
        state.restore(ema=ema)
        ema.copy_to(model)
    info = {"step": state.step, "images_seen": state.images_seen, "ema": with_ema, "num_params": state.num_params}
    return cfg, model.to(device).eval(), info
