"""``--listen`` and ``--manhole`` endpoints that do not parse: one line naming both."""

from __future__ import annotations

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
