"""Shared CLI plumbing: one-line errors instead of tracebacks, and argument checks.

``run_cli(main)`` prints a :class:`FlowlabError` as ``error: ...`` (exit code 2), and an
``OSError`` about a path (permission denied, disk full, a folder that is a file, ...) as one
line naming that path.  Anything else is a bug and keeps its traceback; ``FLOWLAB_DEBUG=1``
shows the traceback of every error.  The ``check_*`` helpers validate arguments before any
work is done.
"""
from __future__ import annotations

import math
import os
import sys

from common.errors import FlowlabError


def debug_enabled() -> bool:
    return os.environ.get("FLOWLAB_DEBUG", "") not in ("", "0")


def run_cli(main) -> None:
    """Call ``main()``; a FlowlabError (or an OSError naming a path) becomes one ``error:`` line, exit code 2."""
    try:
        main()
    except FlowlabError as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        if debug_enabled() or e.filename is None:
            raise
        print(f"error: cannot access {e.filename}: {e.strerror or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_at_least(value, minimum, flag: str) -> None:
    """``value`` (when given) must be an integer >= ``minimum``."""
    if value is not None and value < minimum:
        raise FlowlabError(f"{flag} must be at least {minimum}, got {value}")


def check_number(value: float, flag: str, minimum: float | None = None) -> None:
    """``value`` must be a finite number (>= ``minimum`` when given)."""
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise FlowlabError(f"{flag} must be a finite number{bound}, got {value}")


def check_output_file(path: str, flag: str, extensions: tuple[str, ...] | None = None) -> None:
    """An output file must not be a directory and its folder must exist and be writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FlowlabError(f"{flag} {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise FlowlabError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FlowlabError(f"{flag} {path}: the folder {folder} is not writable")
    if extensions is not None and os.path.splitext(path)[1].lower() not in extensions:
        raise FlowlabError(f"{flag} {path}: unknown image extension (use e.g. .png)")


def check_device(device: str) -> None:
    """A CUDA device must exist."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlowlabError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
