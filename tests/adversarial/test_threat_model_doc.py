"""docs/security.rst cites tests for its claims: every cited test must exist, and
every test of the proving ground (tests/adversarial/, tests/faults/) is cited."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.rst"
# ``file::test`` anywhere (in a literal or not); a literal may wrap mid-line.
CITED = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")
PROVING_GROUND = ("tests/adversarial", "tests/faults")
NOT_A_CLAIM = {"tests/adversarial/test_threat_model_doc.py"}


def defines(source: Path, name: str) -> bool:
    """``source`` defines ``name`` as a top-level test function."""
    return bool(re.search(rf"^(async )?def {name}\(", source.read_text(), re.M))


def test_every_cited_test_exists() -> None:
    text = DOC.read_text()
    cited = CITED.findall(text)
    assert len(cited) > 40
    missing = [
        f"{path}::{name}"
        for path, name in cited
        if not (ROOT / path).exists() or not defines(ROOT / path, name)
    ]
    assert not missing, missing
    # Bare mentions (``test_x`` in a paragraph) must exist somewhere too.
    bare = set(re.findall(r"``(test_\w+)``", text))
    everything = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n in bare if not re.search(rf"^(async )?def {n}\(", everything, re.M)]


def test_every_proving_ground_test_is_cited() -> None:
    """Each attack and fault test says what it shows in the threat model."""
    cited = set(CITED.findall(DOC.read_text()))
    uncited = []
    for folder in PROVING_GROUND:
        for source in sorted((ROOT / folder).glob("test_*.py")):
            path = source.relative_to(ROOT).as_posix()
            if path in NOT_A_CLAIM:
                continue
            for name in re.findall(r"^(?:async )?def (test_\w+)\(", source.read_text(), re.M):
                if (path, name) not in cited:
                    uncited.append(f"{path}::{name}")
    assert not uncited, uncited
