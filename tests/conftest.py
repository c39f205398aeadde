"""Shared fixtures: the external vectors and a real ``twistd -n enclaves`` daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"


def load_vectors(name: str) -> Any:
    """Read one vector file from ../shared/vectors (never from a copy)."""
    path = VECTORS / name
    if not path.exists():
        pytest.fail(f"external vectors missing: {path} (../shared must sit beside the project)")
    return json.loads(path.read_text())
