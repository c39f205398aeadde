"""Atomic, durable file writes: temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "TEMP_SUFFIX",
    "NotSynced",
    "create_exclusive",
    "fsync_dir",
    "temp_name",
    "write_atomic",
]

TEMP_SUFFIX = ".tmp"
# A fresh name, never an existing file or a symlink planted at a guessable name.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(path: Path) -> Path:
    """``.NAME.PID.RANDOM.tmp`` beside ``path`` (storage start-up removes
    stray names starting with ``.`` and ending in ``.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotSynced(OSError):
    """The new file is in place (every reader sees it) but the fsync of its
    directory failed: a crash of the machine could still bring back the old
    one.  An OSError with the directory fsync's errno and strerror."""


def _sync_dir_after(path: Path) -> None:
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise NotSynced(e.errno, e.strerror) from e


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    Raises :class:`NotSynced` if only the last step, the directory's fsync,
    failed: ``path`` then already holds ``data``."""
    path = Path(path)
    temp = temp_name(path)
    fd = os.open(temp, _TEMP_FLAGS, mode)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _sync_dir_after(path)


def create_exclusive(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a new file durably; raises FileExistsError if ``path`` exists.

    The data is written to a temporary file first and then hard-linked into
    place, so no reader ever sees a partly written file.  Raises
    :class:`NotSynced` if only the directory's fsync failed (the file is there).
    """
    path = Path(path)
    temp = temp_name(path)
    fd = os.open(temp, _TEMP_FLAGS, mode)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, path)
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    _sync_dir_after(path)
