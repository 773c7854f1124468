"""Atomic file writes and the one checkpoint error (docs/design.md §6).

A write goes to a temporary file beside the target (``.tmp-<pid>-<name>``), is flushed and
fsynced, and is renamed into place, so an interrupted write never leaves a truncated file under
the real name; the directory is fsynced after the rename. Temporary files left by a killed
writer are removed by :func:`remove_stale_temps` (the checkpoint writers call it before saving).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what its reader expects. The message
    names the file. (A ValueError; also a RuntimeError, as the training loop's was.)"""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames in directory ``path`` durable (best effort where directories cannot be
    opened)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name this process writes ``path`` under (same folder and suffix)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporary files of killed writes of ``name`` (a glob) in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.glob(f"{TMP_PREFIX}*-{name}"):
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers that infer the format
    from it keep working); on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` durably (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
