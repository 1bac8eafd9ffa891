"""glibc malloc settings for a run on the CPU: ``train.cpu_malloc: tuned | default``.

glibc serves an allocation above its mmap threshold with fresh pages from ``mmap`` and hands the
heap's top back to the system above its trim threshold (both start at 128 KiB and follow the sizes
freed, the mmap threshold to at most 32 MiB).  A training step allocates and frees the same large
activations every step (16 x 512 x 32 x 32 float32 is 33.5 MB): each comes back as fresh pages, and
the kernel faults every 4 KiB page in again, zeroing it, at first touch.  On the 2-core CPU of the
README's benchmarks: a 3x3 convolution 3 -> 512 at batch 16, 32 x 32, 13.0 ms -> 3.9 ms; a Residual
Flows paper step 22.5 -> 18.3 s.

``tuned`` (the default): once, when a run's device is the CPU,

    mallopt(M_MMAP_THRESHOLD, 1 GiB),   mallopt(M_TRIM_THRESHOLD, 1 GiB)

so freed blocks stay in the heap and the next step reuses them without faults.  The price: the
process keeps the heap of its peak (its resident memory does not shrink after a peak) and the
heap's fragmentation can raise the peak itself (Residual Flows +8-14% peak RSS, measured).
``default`` leaves glibc's settings alone.  Nothing is changed when the user chose the allocator's
settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
``GLIBC_TUNABLES`` in the environment), preloaded another allocator (an ``LD_PRELOAD`` naming
jemalloc, tcmalloc, mimalloc, ...), or the C library is not glibc.  A process has one allocator, so this is process-wide by
nature, like ``torch.set_num_threads``; the trainer applies it at its start, and ``engine.run.load_run``
(eval.py, sample.py, the codecs) when it loads a run onto the CPU; nothing else does.
"""
from __future__ import annotations

import ctypes
import os

MODES = ("tuned", "default")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _user_setting(environ) -> str | None:
    """The variable through which the user chose the allocator's settings, if any (a preloaded
    library counts when it is an allocator: jemalloc, tcmalloc, mimalloc, ...)."""
    for name in USER_SETTINGS:
        if environ.get(name):
            return name
    return "LD_PRELOAD" if "malloc" in environ.get("LD_PRELOAD", "") else None


def apply_cpu_malloc(mode: str, environ=os.environ) -> str:
    """Apply ``mode`` to this process's allocator; returns what was done: ``tuned``, ``default``,
    ``user: <VARIABLE>`` (the user's own setting stays) or ``unavailable: <why>``."""
    if mode not in MODES:
        raise ValueError(f"unknown cpu_malloc mode {mode!r}; use one of {MODES}")
    if mode == "default":
        return "default"
    user = _user_setting(environ)
    if user:
        return f"user: {user}"
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):  # not a glibc system (macOS, Windows, musl)
        libc_version = None
    if not libc_version or not libc_version.startswith("glibc"):
        return "unavailable: not glibc"
    libc = ctypes.CDLL(None)  # this process's C library
    ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1
    return "tuned" if ok else "unavailable: mallopt refused"
