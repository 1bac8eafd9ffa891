"""In-memory vector data sets: continuous float32 (N, D) tensors, next to ``ImageDataset``.

Every vector data set is one loader registered in :data:`VECTOR_LOADERS`:
``loader(toy, n_train, n_test, dim) -> (train, test, source, label)`` (the ``data`` section's
keys, a loader reads the ones it needs; ``label`` is what figures call the data set).
:func:`load_vectors` adds truncation on top.

    toy2d   ``n_train`` / ``n_test`` seeded samples of the 2-D toy ``toy`` (``data/toy2d.py``);
            the train split is drawn with generator seed 0, the test split with seed 1, so a
            config names one fixed data set whatever ``train.seed`` is
    none    no data at all (energy fits: the objective draws its batches from the model's
            base), vectors of dimension ``dim``; ``train`` and ``test`` are None
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common.errors import FlowlabError
from data import toy2d

VectorLoader = Callable[[str, int, int, int], "tuple[torch.Tensor | None, torch.Tensor | None, str, str]"]
VECTOR_LOADERS: dict[str, VectorLoader] = {}


@dataclass
class VectorDataset:
    """Train and test vectors as float32 tensors (N, D); both None for the data-free ``none``.

    The fields the trainer reads, as on ``ImageDataset``: ``train``, ``test``, ``shape``,
    ``num_dims``, ``n_bits`` (None: continuous), ``name``, ``source`` and ``kind``."""

    train: torch.Tensor | None
    test: torch.Tensor | None
    dim: int
    name: str
    source: str
    label: str = ""  # what the figures call it (the toy's name)

    n_bits = None  # continuous data: no bit depth

    @property
    def kind(self) -> str:
        """"vector" (a data set of vectors) or "none" (no data: energy fits)."""
        return "none" if self.train is None else "vector"

    @property
    def shape(self) -> tuple[int]:
        """(D,) of one example."""
        return (self.dim,)

    @property
    def num_dims(self) -> int:
        return self.dim


def register_vectors(name: str) -> Callable[[VectorLoader], VectorLoader]:
    """Decorator adding ``loader(toy, n_train, n_test, dim) -> (train, test, source, label)`` to VECTOR_LOADERS."""

    def wrap(fn: VectorLoader) -> VectorLoader:
        VECTOR_LOADERS[name] = fn
        return fn

    return wrap


def load_vectors(name: str, toy: str = "two_moons", n_train: int = 20000, n_test: int = 5000, dim: int = 2,
                 max_train: int | None = None, max_test: int | None = None) -> VectorDataset:
    """Load vector data set ``name``; keep the first max_train / max_test examples."""
    if name not in VECTOR_LOADERS:
        raise FlowlabError(f"unknown vector data set {name!r}; known: {', '.join(sorted(VECTOR_LOADERS))}")
    train, test, source, label = VECTOR_LOADERS[name](toy, n_train, n_test, dim)
    if train is not None and (max_train is not None or max_test is not None):
        train, test = train[:max_train].clone(), test[:max_test].clone()
        source += f"; using the first {len(train)} train / {len(test)} test"
    return VectorDataset(train=train, test=test, dim=dim if train is None else int(train.shape[1]), name=name,
                         source=source, label=label)


@register_vectors("toy2d")
def _load_toy2d(toy: str, n_train: int, n_test: int, dim: int):
    if toy not in toy2d.DATASETS:
        raise FlowlabError(f"unknown 2-D toy data.toy={toy!r}; known: {', '.join(toy2d.DATASETS)}")
    for key, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 1:
            raise FlowlabError(f"data.{key} must be at least 1, got {n}")
    train = toy2d.sample(toy, n_train, torch.Generator().manual_seed(0)).float()
    test = toy2d.sample(toy, n_test, torch.Generator().manual_seed(1)).float()
    return train, test, f"2-D toy {toy!r} (data/toy2d.py, seeded: {n_train} train / {n_test} test samples)", toy


@register_vectors("none")
def _load_none(toy: str, n_train: int, n_test: int, dim: int):
    if dim < 1:
        raise FlowlabError(f"data.dim must be at least 1, got {dim}")
    return None, None, f"no data (the objective draws its own batches), vectors of dimension {dim}", "none"
