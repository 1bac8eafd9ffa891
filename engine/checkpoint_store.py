"""The checkpoints of a run directory: the latest, the last K, the best, the exported model.

    RUN_DIR/checkpoint.pt             the latest good training state (what --resume reads)
    RUN_DIR/checkpoints/step_N.pt     the K - 1 before it (``train.keep_checkpoints`` = K)
    RUN_DIR/best.pt                   the state with the lowest test bpd so far (``train.keep_best``)
    RUN_DIR/model.safetensors         the latest state's evaluation weights + config (``engine.model_file``)

The trainer decides *whether* a state is good enough to keep (``Trainer.save``); this
module only files it: every file is written atomically, an older checkpoint moves into the
history as a hard link (a copy where links are not supported), never by rewriting it, and a
crash at any point leaves every file either old or new and whole.  ``clean_temp_files``
removes what a killed writer left behind.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from engine import tensor_file
from engine.checkpoint import TrainingState, checkpoint_header, checkpoint_path
from engine.model_file import MODEL_FILE_NAME, ModelFile

HISTORY_DIR = "checkpoints"
BEST_NAME = "best.pt"


def clean_temp_files(run_dir: str) -> list[str]:
    """Remove the temporary files a killed write left (run directory and history); their paths."""
    removed = tensor_file.clean_temp_files(run_dir)
    if os.path.isdir(os.path.join(run_dir, HISTORY_DIR)):
        removed += tensor_file.clean_temp_files(os.path.join(run_dir, HISTORY_DIR))
    return removed


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` becomes the file ``src`` is now (atomically; ``src`` is never modified)."""
    with tensor_file.atomic_path(dst) as tmp:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


class CheckpointStore:
    """Files good training states into a run directory (see the module docstring)."""

    def __init__(self, run_dir: str, keep: int = 1, keep_best: bool = True):
        self.run_dir, self.keep, self.keep_best = run_dir, keep, keep_best
        self.latest_path = checkpoint_path(run_dir)
        self.best_path = os.path.join(run_dir, BEST_NAME)
        self.model_path = os.path.join(run_dir, MODEL_FILE_NAME)
        self.history_dir = os.path.join(run_dir, HISTORY_DIR)
        self._latest_step = checkpoint_header(self.latest_path)["step"] if os.path.isfile(self.latest_path) else None
        self.best_bpd = None
        if os.path.isfile(self.best_path):
            self.best_bpd = checkpoint_header(self.best_path)["test_bpd"]

    @property
    def latest_step(self) -> int | None:
        """The step of ``checkpoint.pt``, or None before the first checkpoint."""
        return self._latest_step

    def history(self) -> list[tuple[int, str]]:
        """(step, path) of the older kept checkpoints, oldest first."""
        out = []
        for path in glob.glob(os.path.join(glob.escape(self.history_dir), "step_*.pt")):
            m = re.fullmatch(r"step_(\d+)\.pt", os.path.basename(path))
            if m:
                out.append((int(m.group(1)), path))
        return sorted(out)

    def commit(self, state: TrainingState, best: bool = False) -> None:
        """Make ``state`` the latest checkpoint (the previous one joins the history, the oldest
        beyond K are removed), export its model, and with ``best`` make it ``best.pt`` too."""
        if self.keep > 1 and self._latest_step is not None and self._latest_step != state.step:
            os.makedirs(self.history_dir, exist_ok=True)
            _link_or_copy(self.latest_path, os.path.join(self.history_dir, f"step_{self._latest_step:07d}.pt"))
        state.save(self.latest_path)
        history = self.history()
        for _, path in history[: max(0, len(history) - (self.keep - 1))]:
            os.remove(path)
        ModelFile.from_state(state).save(self.model_path)
        if best:
            _link_or_copy(self.latest_path, self.best_path)
        self.note(step=state.step, best_bpd=state.test_bpd if best else None)

    def commit_best(self, state: TrainingState) -> None:
        """Write ``state`` (whose ``test_bpd`` is set) as ``best.pt`` only."""
        state.save(self.best_path)
        self.note(best_bpd=state.test_bpd)

    def note(self, step: int | None = None, best_bpd: float | None = None) -> None:
        """Record a commit made elsewhere (by the main process: other ranks keep the same view)."""
        if step is not None:
            self._latest_step = step
        if best_bpd is not None:
            self.best_bpd = best_bpd

    def improves_best(self, bpd: float | None) -> bool:
        """Whether a state evaluated at ``bpd`` should become ``best.pt``."""
        return self.keep_best and bpd is not None and bpd == bpd and bpd != float("inf") and (
            self.best_bpd is None or bpd < self.best_bpd)

    def latest(self) -> TrainingState | None:
        return TrainingState.load(self.latest_path) if os.path.isfile(self.latest_path) else None
