"""The conformance implementation imports nothing but the standard library,
``cryptography`` and its own modules (the package docstring's rule)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent
MODULES = sorted(PACKAGE.glob("*.py"))
# The conformance implementation, held to the rule ...
IMPLEMENTATION = [p for p in MODULES if p.name in ("__init__.py", "protocol.py", "storage.py")]
# ... and what compares it with the real one, free to import enclaves.
COMPARISON = [p for p in MODULES if p.name.startswith("test_") or p.name == "bridge.py"]
OWN_MODULES = {f"tests.conformance.{p.stem}" for p in IMPLEMENTATION} | {"tests.conformance"}
DYNAMIC_IMPORTS = {"__import__", "import_module", "exec", "eval"}


def forbidden_imports(source: str) -> list[str]:
    """Every import in ``source`` outside the allowed set, and any dynamic import."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            # Inside this package: only its implementation modules (bridge.py
            # and the tests import enclaves).
            if node.module:
                names = [f"tests.conformance.{node.module}"]
            else:
                names = [f"tests.conformance.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [module]
            if node.module == "tests.conformance":
                names = [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call):
            called = node.func
            name = getattr(called, "id", None) or getattr(called, "attr", None)
            names = [f"{name}()"] if name in DYNAMIC_IMPORTS else []
        else:
            continue
        found += [name for name in names if not _allowed(name)]
    return found


def _allowed(module: str) -> bool:
    root = module.split(".")[0]
    if root == "tests":
        return module in OWN_MODULES
    return root in sys.stdlib_module_names or root in ("__future__", "cryptography")


def test_every_module_is_implementation_or_comparison() -> None:
    """A new module must be put on one side: implementation modules keep the rule."""
    assert len(IMPLEMENTATION) == 3
    assert sorted(IMPLEMENTATION + COMPARISON) == MODULES


@pytest.mark.parametrize("path", IMPLEMENTATION, ids=lambda p: p.name)
def test_implementation_imports_only_stdlib_and_cryptography(path: Path) -> None:
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "import enclaves",
        "from enclaves.crypto import KeyPair",
        "import attrs",
        "from tests.storage.helpers import msg_id",
        "from ..storage import helpers",
        "from .. import daemon",
        "importlib.import_module('enclaves')",
        "__import__('enclaves')",
        "from . import bridge",
        "from .bridge import to_real",
        "from tests.conformance import bridge",
        "from tests.conformance.test_interop import x",
    ],
)
def test_the_checker_catches(source: str) -> None:
    assert forbidden_imports(source)


def test_the_checker_allows_what_the_rule_allows() -> None:
    source = "import os, struct\nfrom cryptography.hazmat.primitives import cmac\n"
    source += "from tests.conformance.protocol import Keys\nfrom . import protocol\n"
    assert forbidden_imports(source) == []
