"""Shared fixtures: the external vectors and a real ``twistd -n enclaves`` daemon."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import reap

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"


def load_vectors(name: str) -> Any:
    """Read one vector file from ../shared/vectors (never from a copy)."""
    path = VECTORS / name
    if not path.exists():
        pytest.fail(f"external vectors missing: {path} (../shared must sit beside the project)")
    return json.loads(path.read_text())


class LeakedProcessWarning(UserWarning):
    """A test module left a child process running (it was killed)."""


@pytest.fixture(autouse=True, scope="module")
def _reap_child_processes() -> Iterator[None]:
    """Kill any daemon or client a test module left running (tests/daemon.py)."""
    yield
    for command in reap():
        warnings.warn(f"left running, killed: {command}", LeakedProcessWarning, stacklevel=1)
