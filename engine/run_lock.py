"""One run per directory: an exclusive lock on ``RUN_DIR/.flowlab.lock``.

``RunLock(run_dir).acquire()`` takes an ``flock`` on the lock file and writes the holder
(process id, host, start time, command) into it; a second run on the same directory gets a
one-line error naming the directory and the holder's process id.  The kernel drops an
``flock`` when its process dies, so a lock file left by a killed run (kill -9, power loss)
is *stale*: it is recognised (the file names a holder but nobody holds the lock), taken over
and reported.  ``release()`` removes the file.  Reading a run (eval, sample) takes no lock.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time

from common.errors import FlowlabError

LOCK_NAME = ".flowlab.lock"


def _describe(holder: dict) -> str:
    where = f" on {holder['host']}" if holder.get("host") else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"process {holder.get('pid', '?')}{where}{since}"


class RunLock:
    """Exclusive, crash-safe lock of a run directory held for a whole run (``with RunLock(d): ...``)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None
        self.stale: dict | None = None   # the previous holder, when a stale lock was taken over

    @staticmethod
    def _read(fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        if not raw.strip():
            return None
        try:
            holder = json.loads(raw)
        except ValueError:
            return {"pid": "?"}
        return holder if isinstance(holder, dict) else {"pid": "?"}

    def acquire(self) -> "RunLock":
        """Take the lock; a live holder is a one-line error, a stale lock is taken over (``self.stale``)."""
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise FlowlabError(f"cannot write to run directory {self.run_dir}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._read(fd) or {}
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FlowlabError(f"{self.run_dir} is in use by another run ({_describe(holder)}): wait for it "
                                       f"to finish or choose another --out") from None
                raise FlowlabError(f"cannot lock {self.path}: {e.strerror} (the file system does not support "
                                   f"locks; use a local run directory)") from None
            try:  # the holder we waited on may have removed the file: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale = self._read(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def stale_message(self) -> str | None:
        """What to tell the user when a stale lock was taken over (else None)."""
        if self.stale is None:
            return None
        return (f"note: {self.run_dir} was locked by {_describe(self.stale)}, which is no longer running "
                f"(killed?); taking the lock over")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
