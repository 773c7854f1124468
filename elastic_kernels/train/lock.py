"""One writer per run directory: an advisory lock file holding the writer's PID.

The lock is an ``fcntl.flock`` on ``<run_dir>/.lock``: the kernel drops it when its process dies,
so a lock file left by a killed run (a dead PID) is simply taken over by the next run, and a PID
reused by an unrelated process cannot keep a run directory locked.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["RunLock", "RunLockedError"]


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """``with RunLock(run_dir):`` — or ``acquire()`` / ``release()``."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"run directory {self.path.parent} is in use by another process (PID {holder}, "
                                 f"lock file {self.path}); wait for it to finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
