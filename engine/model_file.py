"""The exported model: ``RUN_DIR/model.safetensors``, weights only, plus the resolved config.

What ``sample.py`` / ``eval.py`` / ``compress.py`` need and what one shares: the weights the
run evaluates with (the EMA's when the run keeps one, else the raw ones) as a safetensors
file whose tensors are the model's state dict under its own names, and in its header the
resolved config (JSON), the data shape, the step, images seen and which weights these are.
No optimizer state, nothing that can run code.  ``engine.checkpoint_store`` writes it beside
every checkpoint; ``engine.run.load_run`` accepts it in place of a run directory.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from common.errors import FlowlabError
from engine import tensor_file
from engine.checkpoint import TrainingState
from engine.config import resolve

MODEL_FILE_NAME = "model.safetensors"
KIND = "model"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ModelFile:
    """Weights (a state dict) and what is needed to rebuild and describe the model."""

    config: dict
    weights: dict
    data_shape: tuple[int, ...]
    step: int = 0
    images_seen: int = 0
    ema: bool = False               # the weights are the EMA's
    num_params: int | None = None
    world_size: int | None = None   # training processes (files written before it was recorded: None)
    path: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_state(cls, state: TrainingState) -> "ModelFile":
        """The evaluation weights of a training state (EMA when kept, in the model's dtypes)."""
        if state.data_shape is None:
            raise FlowlabError("cannot export a model whose checkpoint does not record its data shape")
        weights = state.model
        if state.ema is not None:
            weights = {k: v.to(state.model[k].dtype) for k, v in state.ema["shadow"].items()}
        return cls(config=state.config, weights=weights, data_shape=tuple(state.data_shape), step=state.step,
                   images_seen=state.images_seen, ema=state.ema is not None, num_params=state.num_params,
                   world_size=state.world_size)

    def save(self, path: str) -> None:
        meta = {"format_version": FORMAT_VERSION, "config": json.dumps(self.config),
                "data_shape": json.dumps(list(self.data_shape)), "step": self.step,
                "images_seen": self.images_seen, "weights": "ema" if self.ema else "raw",
                "num_params": "" if self.num_params is None else self.num_params,
                "world_size": "" if self.world_size is None else self.world_size}
        tensor_file.write_tensors(path, self.weights, {tensor_file.KIND_KEY: KIND, **meta})

    @classmethod
    def load(cls, path: str) -> "ModelFile":
        """Read an exported model; another safetensors file or a damaged header is a one-line error."""
        weights, meta = tensor_file.read_tensors(path)
        if meta.get(tensor_file.KIND_KEY) != KIND:
            raise FlowlabError(f"{path} is not a flowlab model file (no flowlab config in its header)")
        try:
            config = json.loads(meta["config"])
            shape = tuple(json.loads(meta["data_shape"]))
            step, images_seen = int(meta["step"]), int(meta["images_seen"])
            num_params = int(meta["num_params"]) if meta.get("num_params") else None
            world_size = int(meta["world_size"]) if meta.get("world_size") else None
            ema = {"ema": True, "raw": False}[meta["weights"]]
        except (KeyError, ValueError, TypeError) as e:
            raise FlowlabError(f"{path} is a damaged flowlab model file ({type(e).__name__} in its header)") from None
        if not isinstance(config, dict) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise FlowlabError(f"{path} is a damaged flowlab model file (config or data shape)")
        try:
            config = resolve(config)
        except FlowlabError as e:
            raise FlowlabError(f"model file {path}: {e}") from None
        if not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise FlowlabError(f"{path} is a damaged flowlab model file")
        return cls(config=config, weights=weights, data_shape=shape, step=step, images_seen=images_seen,
                   ema=ema, num_params=num_params, world_size=world_size, path=path)
