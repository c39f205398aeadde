"""``--listen`` and ``--manhole`` endpoints that do not parse: one line naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from enclaves.server.listening import listening_service
from enclaves.serverkey import StartupError


def _refusal(description: str, option: str = "--listen") -> str:
    with pytest.raises(StartupError) as info:
        listening_service(option, description, Factory(), Clock())
    return str(info.value)


def test_control_characters_in_an_endpoint_are_escaped() -> None:
    message = _refusal("nonsense\x1b[2J:7500\n")
    assert message.startswith("--listen nonsense\\x1b[2J:7500\\n: ")
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("tcp:notaport", "'notaport' is not a number, and the port must be one"),
        ("tcp:7500:bogus=1", "unknown parameter 'bogus'"),
        ("nonsense:7500", "unknown endpoint type 'nonsense'"),
    ],
)
def test_an_endpoint_that_does_not_parse_is_named_with_the_reason(
    description: str, reason: str
) -> None:
    message = _refusal(description, "--manhole")
    assert message.startswith(f"--manhole {description}: not a valid endpoint: {reason} (e.g. ")
    assert "invalid literal" not in message and "_parse" not in message
    assert "\n" not in message


def test_a_certificate_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "key.pem"
    message = _refusal(f"ssl:7500:privateKey={missing}")
    assert message == (
        f"--listen ssl:7500:privateKey={missing}: cannot read {missing}: No such file or directory"
    )
