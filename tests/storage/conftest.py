"""Fixtures of the storage tests: a server key and a data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclaves.crypto import KeyPair


@pytest.fixture
def keys() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path
