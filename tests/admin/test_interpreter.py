"""The shell's interpreter over an in-memory terminal: Deferred results, one-line errors."""

from __future__ import annotations

import re
from typing import Any

from twisted.conch.insults import insults
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from enclaves.admin import AdminError, Text
from enclaves.manhole import AdminIdentity, AdminManhole

_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_=>78c]|\r")


def terminal(namespace: dict[str, Any]) -> tuple[StringTransport, insults.ServerProtocol]:
    identity = AdminIdentity("admin", "SHA256:x", "alice@laptop")
    server = insults.ServerProtocol(AdminManhole, namespace, identity)
    transport = StringTransport()
    server.makeConnection(transport)
    return transport, server


def shown(transport: StringTransport) -> str:
    text = _ESCAPES.sub(b"", transport.value()).decode()
    transport.clear()
    return text


def type_line(server: insults.ServerProtocol, line: str) -> None:
    server.dataReceived(line.encode() + b"\r")


def test_pending_deferred_prints_its_text_when_it_fires() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    transport, server = terminal({"slow": lambda: pending})
    assert "Type help() for the commands" in shown(transport)
    type_line(server, "slow()")
    before = shown(transport)
    assert "Deferred" not in before and before.endswith("enclaves> ")
    pending.callback(Text("two users\nboth online"))
    after = shown(transport)
    assert "two users\nboth online\n" in after and "Deferred" not in after


def test_failed_deferred_and_raised_errors_are_one_line() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    namespace = {
        "slow": lambda: pending,
        "bad": lambda: (_ for _ in ()).throw(AdminError("no user 5 (users() lists them)")),
    }
    transport, server = terminal(namespace)
    shown(transport)
    type_line(server, "bad()")
    assert "error: no user 5 (users() lists them)\n" in shown(transport)
    type_line(server, "1/0")
    out = shown(transport)
    assert "error: ZeroDivisionError: division by zero\n" in out and "Traceback" not in out
    type_line(server, "slow()")
    pending.errback(AdminError("the disk refused the write"))
    out = shown(transport)
    assert "error: the disk refused the write\n" in out and "Traceback" not in out
    type_line(server, "def (")
    assert "error: invalid syntax" in shown(transport)


def test_plain_values_and_text() -> None:
    transport, server = terminal({"answer": lambda: Text("plain\ntext")})
    shown(transport)
    type_line(server, "answer()")
    assert "plain\ntext\n" in shown(transport)
    type_line(server, "1 + 1")
    assert "2\n" in shown(transport)


def test_a_text_result_is_followed_by_one_prompt() -> None:
    """A str result shown at once draws no extra prompt of its own (it is not
    asynchronous output): one prompt after it, as after ``1 + 1``."""
    transport, server = terminal({"answer": lambda: Text("plain")})
    shown(transport)
    for line in ("answer()", '"abc"', "1 + 1"):
        type_line(server, line)
        out = shown(transport)
        assert out.count("enclaves> ") == 1, (line, out)


def test_typed_lines_are_logged_with_tokens_masked() -> None:
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        _, server = terminal({})
        type_line(server, 'x = "enclaves1:' + "A" * 96 + '@h:1"')
    finally:
        globalLogPublisher.removeObserver(events.append)
    log = "\n".join(formatEvent(event) for event in events)
    assert 'admin admin key SHA256:x (alice@laptop) typed: x = "enclaves1:<masked>@h:1"' in log
    assert "A" * 20 not in log


def test_on_a_terminal_results_and_prints_have_their_escapes_escaped() -> None:
    transport, server = terminal({"colour": lambda: Text("\x1b]0;pwned\x07title\n")})
    shown(transport)
    type_line(server, "colour()")
    type_line(server, 'print("\\x1b[2J")')
    type_line(server, '"\\x1b[31m"')
    raw = transport.value()
    assert b"pwned" in raw and b"\x07" not in raw and b"\x1b]" not in raw
    text = _ESCAPES.sub(b"", raw).decode()
    assert "\\x1b]0;pwned\\x07title\n" in text
    assert "\\x1b[2J\n" in text and "\\x1b[31m\n" in text
