"""The admin shell without a terminal, over an in-memory transport: order, end of input."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from enclaves.admin import AdminError, Text
from enclaves.adminshell import LINES_PER_TURN, MAX_PENDING_INPUT, AdminLineShell
from enclaves.manhole import AdminIdentity

WHO = AdminIdentity("admin", "SHA256:x", "alice@laptop")


def line_shell(
    namespace: dict[str, Any], newline: bytes = b"\n", clock: Clock | None = None
) -> tuple[Any, list[int]]:
    finished: list[int] = []
    shell = AdminLineShell(namespace, WHO, finished.append, newline=newline, clock=clock or Clock())
    transport = StringTransport()
    shell.makeConnection(transport)
    return shell, finished


def output(shell: AdminLineShell) -> str:
    return shell.transport.value().decode()  # type: ignore[union-attr]


def test_end_of_input_waits_for_the_answer_of_a_pending_command() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    shell, finished = line_shell({"slow": lambda: pending})
    shell.dataReceived(b"slow()\n")
    shell.end_of_input()
    assert output(shell) == "" and finished == []
    pending.callback(Text("enclaves1:token"))
    assert output(shell) == "enclaves1:token\n"
    assert finished == [0]


def test_ctrl_d_byte_ends_input_and_what_follows_is_ignored() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    shell, finished = line_shell({"slow": lambda: pending, "boom": lambda: 1 / 0})
    shell.dataReceived(b"slow()\n\x04boom()\n")
    assert finished == []
    pending.callback(Text("done"))
    assert output(shell) == "done\n" and finished == [0]
    shell.dataReceived(b"boom()\n")  # after the end: not run
    assert output(shell) == "done\n"


def test_each_line_waits_for_the_output_of_the_one_before() -> None:
    first: defer.Deferred[Text] = defer.Deferred()
    shell, finished = line_shell({"first": lambda: first, "second": lambda: Text("second")})
    shell.dataReceived(b"first()\nsecond()\n")
    assert output(shell) == ""
    first.callback(Text("first"))
    assert output(shell) == "first\nsecond\n"
    shell.end_of_input()
    assert finished == [0]


def test_plain_text_no_prompt_no_escapes_crlf_and_lone_last_line() -> None:
    shell, finished = line_shell({"two": lambda: Text("a\nb")})
    shell.dataReceived(b"two()\r\n1 + 1\r\nprint('x')")
    assert output(shell) == "a\nb\n2\n"
    shell.end_of_input()  # the last line, without its newline, still runs
    assert output(shell) == "a\nb\n2\nx\n" and finished == [0]
    assert "\x1b" not in output(shell)


def test_errors_are_one_line_and_give_exit_status_1() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    namespace = {
        "slow": lambda: pending,
        "bad": lambda: (_ for _ in ()).throw(AdminError("no user 5 (users() lists them)")),
    }
    shell, finished = line_shell(namespace)
    shell.dataReceived(b"bad()\nslow()\nno_such_name\n")
    pending.errback(AdminError("the disk refused the write"))
    shell.end_of_input()
    assert output(shell) == (
        "error: no user 5 (users() lists them)\n"
        "error: the disk refused the write\n"
        "error: NameError: name 'no_such_name' is not defined\n"
    )
    assert finished == [1]


def test_block_and_unfinished_statement_at_the_end() -> None:
    shell, finished = line_shell({})
    shell.dataReceived(b"def f():\n    return 41 + 1\n\nf()\nfor i in (1, 2):\n    print(i)\n")
    shell.end_of_input()  # the open block is completed, as by an empty line
    assert output(shell) == "42\n1\n2\n" and finished == [0]

    shell, finished = line_shell({})
    shell.dataReceived(b"users(\n")
    shell.end_of_input()
    assert output(shell) == "error: the input ended inside a statement\n"
    assert finished == [1]


def test_newline_for_a_pty_and_nothing_written_after_the_connection_is_lost() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    shell, finished = line_shell({"two": lambda: Text("a\nb"), "slow": lambda: pending}, b"\r\n")
    shell.dataReceived(b"two()\nslow()\n")
    assert output(shell) == "a\r\nb\r\n"
    shell.connectionLost()
    pending.callback(Text("late"))
    shell.end_of_input()
    assert output(shell) == "a\r\nb\r\n" and finished == []


def test_lines_logged_with_tokens_masked() -> None:
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        shell, _ = line_shell({})
        shell.dataReceived(b'x = "enclaves1:' + b"A" * 96 + b'@h:1"\n\xff\n')
    finally:
        globalLogPublisher.removeObserver(events.append)
    log = "\n".join(formatEvent(event) for event in events)
    assert 'admin admin key SHA256:x (alice@laptop) typed: x = "enclaves1:<masked>@h:1"' in log
    assert "A" * 20 not in log


def test_exit_leaves_like_end_of_input_after_pending_answers() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    ran: list[str] = []
    shell, finished = line_shell({"slow": lambda: pending, "later": lambda: ran.append("x")})
    shell.dataReceived(b"slow(); exit()\nlater()\n")
    assert finished == []
    pending.callback(Text("token"))
    assert output(shell) == "token\n" and finished == [0]
    assert ran == []  # nothing after exit() runs
    shell2, finished2 = line_shell({})
    shell2.dataReceived(b"quit()\n")
    assert finished2 == [0]


def test_input_waiting_beyond_the_bound_ends_the_input_with_an_error() -> None:
    pending: defer.Deferred[Text] = defer.Deferred()
    shell, finished = line_shell({"slow": lambda: pending})
    shell.dataReceived(b"slow()\n")
    shell.dataReceived(b"1\n" * (MAX_PENDING_INPUT // 2 + 1))
    assert "bytes of input waiting; the rest of the input is ignored" in output(shell)
    pending.callback(Text("done"))
    assert output(shell).endswith("done\n") and finished == [1]


def test_an_unexpected_error_is_logged_with_tokens_masked() -> None:
    from twisted.logger import capturedLogs

    def boom() -> None:
        raise KeyError("enclaves1:SECRETSECRETSECRET")

    shell, finished = line_shell({"boom": boom})
    with capturedLogs() as events:
        shell.dataReceived(b"boom()\n")
        shell.end_of_input()
    assert finished == [1]
    logged = repr(events)
    assert "SECRETSECRET" not in logged and "enclaves1:<masked>" in logged


def test_many_waiting_lines_run_a_share_per_reactor_turn() -> None:
    """Thousands of lines typed ahead must not hold the reactor (the users'
    traffic) for seconds: at most LINES_PER_TURN run per turn."""
    clock = Clock()
    ran: list[int] = []
    shell, finished = line_shell({"f": ran.append}, clock=clock)
    shell.dataReceived(b"".join(b"f(%d)\n" % i for i in range(3 * LINES_PER_TURN + 5)))
    shell.end_of_input()
    # One share ran; the next waits for the next reactor turn.
    assert len(ran) == LINES_PER_TURN and finished == []
    assert [c.getTime() for c in clock.getDelayedCalls()] == [0]
    clock.advance(0)  # (task.Clock runs the later shares in this one advance)
    assert ran == list(range(3 * LINES_PER_TURN + 5)) and finished == [0]


def test_escape_sequences_in_output_and_in_the_log_are_escaped() -> None:
    """A result, a print() or an error cannot send the admin's terminal an
    escape sequence, nor a typed line put one in the server log."""
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        shell, finished = line_shell({"slow": lambda: defer.succeed(Text("a\x1b[2Jb\nc\td"))})
        shell.dataReceived(b'"\x1b[31mRED\x1b[0m"\n\x1b]0;pwned\x07\nprint("\\x9b1m\\r")\nslow()\n')
        shell.end_of_input()
    finally:
        globalLogPublisher.removeObserver(events.append)
    out = output(shell)
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\r" not in out
    assert out.startswith("\\x1b[31mRED\\x1b[0m\nerror: ")
    assert "\\x9b1m\\r\n" in out and out.endswith("a\\x1b[2Jb\nc\td\n")
    assert finished == [1]
    log = "\n".join(formatEvent(event) for event in events)
    assert "typed: \\x1b]0;pwned\\x07" in log
    assert "\x1b" not in log and "\x07" not in log
