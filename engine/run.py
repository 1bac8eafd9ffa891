"""Loading a trained model for sampling, evaluation and compression.

``load_run`` takes a run directory (its ``checkpoint.pt``, or its ``model.safetensors`` when
only that was shared), a checkpoint file (``best.pt``, ``checkpoints/step_N.pt``) or an
exported ``model.safetensors`` (``engine.model_file``).  Nothing it reads can run code
(``engine.checkpoint``).  Refused with one line: weights that are not finite, and a
checkpoint whose model is not the one its run directory's ``config.yaml`` describes.  On the CPU
the run's ``train.cpu_malloc`` is applied (``engine.cpu_malloc``), as the trainer does.
"""
from __future__ import annotations

import os

import torch
import yaml

from common.errors import FlowlabError
from engine import tensor_file
from engine.checkpoint import TrainingState, checkpoint_path, load_model_state
from engine.config import resolve
from engine.cpu_malloc import apply_cpu_malloc
from engine.ema import EMA
from engine.model_file import KIND as MODEL_KIND, MODEL_FILE_NAME, ModelFile
from engine.sections import RunConfig
from engine.setup import make_model


def _source(path: str) -> str:
    """The file to load for ``path`` (a run directory or a file)."""
    if os.path.isdir(path):
        for name in (os.path.basename(checkpoint_path(path)), MODEL_FILE_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FlowlabError(f"no checkpoint in {path} (neither {os.path.basename(checkpoint_path(path))} nor "
                           f"{MODEL_FILE_NAME})")
    if not os.path.isfile(path):
        raise FlowlabError(f"run directory or model file not found: {path}")
    return path


def _is_model_file(path: str) -> bool:
    return (tensor_file.file_format(path) == "safetensors"
            and tensor_file.read_metadata(path).get(tensor_file.KIND_KEY) == MODEL_KIND)


def _check_run_config(source: str, cfg: RunConfig) -> None:
    """A checkpoint of another family (or model) than its folder's ``config.yaml`` is refused."""
    config_file = os.path.join(os.path.dirname(source), "config.yaml")
    if not os.path.isfile(config_file):
        return
    try:
        with open(config_file) as f:
            run_cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # not ours to judge: the checkpoint carries its own config
    model = run_cfg.get("model") if isinstance(run_cfg, dict) else None
    if not isinstance(model, dict):
        return
    if model.get("name") != cfg.model["name"]:
        raise FlowlabError(f"{source} holds a {cfg.model['name']!r} model but {config_file} describes a "
                           f"{model.get('name')!r} run: refusing to use a checkpoint of another family")
    try:
        described = resolve(run_cfg)["model"]
    except FlowlabError:
        return
    if described != cfg.model:
        key = next(k for k in {**described, **cfg.model} if described.get(k) != cfg.model.get(k))
        raise FlowlabError(f"{source} holds a model with model.{key}={cfg.model.get(key)!r} but {config_file} "
                           f"says {described.get(key)!r}: refusing a checkpoint of another model")


def _check_finite(model: torch.nn.Module, source: str) -> None:
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FlowlabError(f"{source} holds non-finite weights (e.g. {name}): there is nothing to evaluate or "
                               f"sample; use an earlier checkpoint")


def load_run(path: str, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(typed config, model in eval mode, checkpoint info) of a run directory or a model file.

    The model is rebuilt from the config the file carries and loaded with its EMA weights
    when the run kept an EMA and ``use_ema`` is set (an exported file holds only the weights
    the run evaluates with)."""
    source = _source(path)
    if _is_model_file(source):
        exported = ModelFile.load(source)
        cfg = RunConfig.from_resolved(exported.config)
        _check_run_config(source, cfg)
        if exported.ema and not use_ema:
            raise FlowlabError(f"{source} holds only the EMA weights; --no-ema needs the run's checkpoint.pt")
        model = make_model(cfg, exported.data_shape, cfg.data.n_bits)
        load_model_state(model, exported.weights, source)
        info = {"step": exported.step, "images_seen": exported.images_seen, "ema": exported.ema,
                "num_params": exported.num_params, "world_size": exported.world_size}
    else:
        state = TrainingState.load(source)
        cfg = RunConfig.from_resolved(state.config)
        _check_run_config(source, cfg)
        if state.data_shape is None:
            raise FlowlabError(f"{source} does not record the data shape it was trained on")
        model = make_model(cfg, state.data_shape, cfg.data.n_bits)
        state.restore(model=model)
        with_ema = use_ema and state.ema is not None
        if with_ema:
            ema = EMA(model, 0.0)
            state.restore(ema=ema)
            ema.copy_to(model)
        info = {"step": state.step, "images_seen": state.images_seen, "ema": with_ema, "num_params": state.num_params,
                "world_size": state.world_size}
    _check_finite(model, source)
    if torch.device(device).type == "cpu":  # the run's allocator setting for its evaluation and sampling too
        apply_cpu_malloc(cfg.train.cpu_malloc)
    return cfg, model.to(device).eval(), info
