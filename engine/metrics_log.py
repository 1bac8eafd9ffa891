"""``RUN_DIR/metrics.jsonl``: one JSON object per recorded value, ``{"step", "images_seen", name: value}``.

A resumed run continues from its checkpoint's step, so the rows a crashed run wrote after
that step are dropped first (``truncate``): every step appears once.  A non-finite rollback
moves the rows after the step it returns to into ``metrics.rolled_back.jsonl`` instead, so
the diverged stretch stays on record without duplicating steps.
"""
from __future__ import annotations

import json
import os

from engine.tensor_file import atomic_path

METRICS_NAME = "metrics.jsonl"
ROLLED_BACK_NAME = "metrics.rolled_back.jsonl"


def append(run_dir: str, row: dict) -> None:
    with open(os.path.join(run_dir, METRICS_NAME), "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate(run_dir: str, step: int, moved_to: str | None = None) -> int:
    """Keep the rows with ``step <= step`` (and drop a half-written last line); the others are
    removed, or appended to ``RUN_DIR/moved_to``.  Returns how many rows were removed."""
    path = os.path.join(run_dir, METRICS_NAME)
    if not os.path.isfile(path):
        return 0
    kept, removed = [], []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step
            except ValueError:
                keep = False
            (kept if keep else removed).append(line if line.endswith("\n") else line + "\n")
    if not removed:
        return 0
    if moved_to is not None:
        with open(os.path.join(run_dir, moved_to), "a") as f:
            f.writelines(removed)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(kept)
    return len(removed)
