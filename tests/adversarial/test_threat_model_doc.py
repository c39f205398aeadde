"""docs/security.rst cites tests for its claims: every cited test must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"``(tests/[\w/]+\.py)::(test_\w+)``")


def test_every_cited_test_exists() -> None:
    text = (ROOT / "docs" / "security.rst").read_text()
    cited = CITED.findall(text)
    assert len(cited) > 40
    missing = []
    for path, name in cited:
        source = ROOT / path
        if not source.exists() or not re.search(
            rf"^(async )?def {name}\(", source.read_text(), re.M
        ):
            missing.append(f"{path}::{name}")
    assert not missing, missing
    # Bare mentions (``test_x`` in a paragraph) must exist somewhere too.
    bare = set(re.findall(r"``(test_\w+)``", text))
    everything = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n in bare if not re.search(rf"def {n}\(", everything)]
