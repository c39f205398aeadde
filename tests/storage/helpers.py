"""Shared helpers of the storage tests."""

from __future__ import annotations

import os
from pathlib import Path

from enclaves.crypto import KeyPair
from enclaves.storage.filestore import FileStorage


def msg_id(number: int) -> bytes:
    return number.to_bytes(16, "big")


def make_storage(data_dir: Path, keys: KeyPair, **kwargs: object) -> FileStorage:
    """A started FileStorage; the caller stops it (``await storage.stopService()``)."""
    storage = FileStorage(data_dir, keys, **kwargs)  # type: ignore[arg-type]
    storage.startService()
    return storage


def random_blob(size: int) -> bytes:
    return os.urandom(size)
