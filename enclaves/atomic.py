"""Atomic, durable file writes: temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "write_atomic", "create_exclusive", "fsync_dir"]

TEMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
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
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a new file durably; raises FileExistsError if ``path`` exists.

    The data is written to a temporary file first and then hard-linked into
    place, so no reader ever sees a partly written file.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
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
    fsync_dir(path.parent)
