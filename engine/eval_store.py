"""Per-image evaluation results on disk, written as they are computed, so a rerun skips them.

    RUN/eval/<split>-<bound>-K<k>[-first<N>]/per_image.npy   float64 bits/dim of every image (NaN: not yet)
    RUN/eval/<split>-<bound>-K<k>[-first<N>]/state.json      what is done, and of what

``state.json`` holds the ``identity`` of the numbers (the evaluated weights' sha256 and step,
the noise seed, the data's sha256 and count, the split, K) and ``done``, the image ranges
[lo, hi) already scored.  Both files are replaced atomically (``engine.tensor_file.atomic_path``),
the array first, so a kill at any point leaves a state that claims no more than the array holds.
A state whose identity differs from the evaluation's (another checkpoint, seed or data) is
never reused: the evaluation starts over and says so.
"""
from __future__ import annotations

import json
import os

import numpy as np

from common.errors import FlowlabError
from engine.tensor_file import atomic_path

FORMAT = 1
ARRAY, STATE = "per_image.npy", "state.json"


def result_dir(root: str, split: str, kind: str, k: int, first: int | None = None) -> str:
    """The folder of one evaluation: ``kind`` is the likelihood kind ("bound", "iw", "exact", "estimated")."""
    return os.path.join(root, f"{split}-{kind}-K{k}" + (f"-first{first}" if first else ""))


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


class EvalStore:
    """The per-image results of one evaluation (``identity``) in ``folder``: ``values`` (N,) and ``done`` ranges."""

    def __init__(self, folder: str, identity: dict, n: int):
        self.folder, self.identity, self.n = folder, identity, n
        self.values = np.full(n, np.nan)
        self.done: list[list[int]] = []
        self.note: str | None = None  # why earlier results were not reused, when there were some

    @classmethod
    def open(cls, folder: str, identity: dict, n: int) -> "EvalStore":
        """The results so far when ``folder`` holds this evaluation's, else an empty store."""
        store = cls(folder, identity, n)
        state_file = os.path.join(folder, STATE)
        if not os.path.isfile(state_file):
            return store
        try:
            with open(state_file) as f:
                state = json.load(f)
            values = np.load(os.path.join(folder, ARRAY), allow_pickle=False)
        except (OSError, ValueError) as e:
            store.note = f"unreadable earlier results in {folder} ({type(e).__name__}): starting over"
            return store
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("identity") != identity:
            old = state.get("identity", {}) if isinstance(state, dict) else {}
            diff = sorted(k for k in {**old, **identity} if old.get(k) != identity.get(k)) if isinstance(old, dict) else []
            store.note = (f"earlier results in {folder} are of another evaluation (different {', '.join(diff) or 'format'}): "
                          f"not reused, starting over")
            return store
        if values.shape != (n,) or values.dtype != np.float64:
            store.note = f"earlier results in {folder} have shape {values.shape}, expected ({n},): starting over"
            return store
        store.values, store.done = values, _merge([list(map(int, r)) for r in state.get("done", [])])
        return store

    def pending(self) -> np.ndarray:
        """Indices of the images not yet scored, in order."""
        mask = np.ones(self.n, dtype=bool)
        for lo, hi in self.done:
            mask[lo:hi] = False
        return np.flatnonzero(mask)

    @property
    def complete(self) -> bool:
        return self.done == [[0, self.n]] or self.n == 0

    def record(self, indices: np.ndarray, values: np.ndarray, extra: dict | None = None) -> None:
        """Store the scores of ``indices`` (runs of consecutive indices) and write both files."""
        self.values[indices] = values
        if len(indices):
            breaks = np.flatnonzero(np.diff(indices) != 1)
            starts = np.concatenate([[indices[0]], indices[breaks + 1]])
            ends = np.concatenate([indices[breaks], [indices[-1]]]) + 1
            self.done = _merge(self.done + [[int(a), int(b)] for a, b in zip(starts, ends)])
        self.save(extra)

    def save(self, extra: dict | None = None) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
            with atomic_path(os.path.join(self.folder, ARRAY)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, self.values, allow_pickle=False)
            state = {"format": FORMAT, "identity": self.identity, "n": self.n, "done": self.done,
                     "complete": self.complete, **(extra or {})}
            with atomic_path(os.path.join(self.folder, STATE)) as tmp:
                with open(tmp, "w") as f:
                    json.dump(state, f, indent=1)
        except OSError as e:
            raise FlowlabError(f"cannot write evaluation results to {self.folder}: {e.strerror or e}") from None
