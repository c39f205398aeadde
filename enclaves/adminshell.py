"""What runs inside an admin's SSH session: the interpreter, and its two front ends.

:class:`AdminManhole` is the interactive shell on a terminal (a pty):
prompt, line editing, history.  :class:`AdminLineShell` is the same
interpreter without a terminal (``ssh -T``, or a command given to ssh):
plain lines in, plain text out, no escape sequences.  In both, what the
shell writes has its control characters escaped (:func:`shown`), and so has
every line logged.  See docs/admin.rst.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any, cast

from twisted.conch import manhole
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from enclaves.printable import printable

__all__ = ["AdminInterpreter", "AdminLineShell", "AdminManhole"]

log = Logger()

#: Anything shaped like an enrollment token is masked before an input line is logged.
_TOKEN_PATTERN = re.compile(r"enclaves1:[A-Za-z0-9_-]+")

#: Ends the input of a session without a terminal, like Ctrl-D on one.
END_OF_INPUT = b"\x04"

#: A typed line longer than this is logged cut short.
MAX_LOGGED_LINE = 1000

#: Lines run in one reactor turn; the rest wait for the next turn.
LINES_PER_TURN = 64

#: Input waiting to run (typed ahead of a slow answer) in a session without a
#: terminal; more ends the input with an error rather than grow without bound.
MAX_PENDING_INPUT = 1 << 20


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    name = type(error).__name__
    if getattr(error, "admin_message", False):
        return f"error: {text}"
    return f"error: {name}: {text}" if text else f"error: {name}"


def shown(data: str | bytes) -> str:
    """Output of the shell as it is written: control characters but newline
    and tab escaped (``\\x1b``), so no result or ``print()`` can send the
    admin's terminal an escape sequence."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return printable(data, keep="\n\t")


def log_typed_line(identity: object, line: bytes) -> None:
    """Log one input line of an admin, tokens masked, control characters escaped."""
    text = mask_tokens(line.decode("utf-8", "replace"))
    if len(text) > MAX_LOGGED_LINE:
        text = text[:MAX_LOGGED_LINE] + f"... ({len(text)} characters)"
    text = printable(text)
    if text.strip():
        log.info("admin {admin} typed: {line}", admin=str(identity), line=text)


def mask_tokens(text: str) -> str:
    return _TOKEN_PATTERN.sub("enclaves1:<masked>", text)


def log_unexpected(identity: object, error: BaseException, failure: Failure | None) -> None:
    """Log an unexpected error for the server log (tokens masked, like typed
    lines: an error's text may quote one); the admin sees one line."""
    if getattr(error, "admin_message", False) or isinstance(
        error, (NameError, TypeError, ValueError, AttributeError, SyntaxError)
    ):
        return
    failure = failure or Failure()
    log.error(
        "admin {admin}: unexpected error in a command: {error}",
        admin=str(identity),
        error=printable(mask_tokens(f"{type(error).__name__}: {error}")),
        traceback=printable(mask_tokens(failure.getTraceback()), keep="\n"),
    )


class AdminInterpreter(manhole.ManholeInterpreter):
    """The manhole interpreter, for admins: one-line errors, command text not reprs.

    A command returns a Deferred; its text is printed when it fires, while
    the reactor goes on serving users.  :meth:`when_shown` tells when every
    such text has been written; :attr:`failed` whether any error was shown.
    The handler provides ``addOutput(data, isAsync)`` and ``log_error(error, failure)``.
    """

    def __init__(self, handler: Any, namespace: dict[str, Any] | None) -> None:
        super().__init__(handler, namespace)
        self._synchronous = False
        self._outstanding = 0
        self._waiting: list[defer.Deferred[None]] = []
        self.failed = False

    @property
    def outstanding(self) -> int:
        """How many Deferred results are still to be shown."""
        return self._outstanding

    def when_shown(self) -> defer.Deferred[None]:
        """Fires once every Deferred result so far has been shown."""
        if not self._outstanding:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    def runcode(self, *a: Any, **kw: Any) -> None:
        try:
            super().runcode(*a, **kw)
        except SystemExit:
            # exit() or quit(): the admin leaves the shell (the server goes on).
            self.handler.leave()

    def showtraceback(self) -> None:
        error = sys.exc_info()[1]
        if error is not None:
            self.failed = True
            self.handler.log_error(error)
            self.write(_one_line(error) + "\n")

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        self.failed = True
        error = sys.exc_info()[1]
        message = getattr(error, "msg", None) or str(error)
        self.write(f"error: {message} (type help() for the commands)\n")

    def excepthook(self, excType: Any, excValue: BaseException, excTraceback: Any) -> None:
        self.failed = True
        self.write(_one_line(excValue) + "\n")

    def displayhook(self, obj: object) -> None:
        if obj is None:
            return
        self.locals["_"] = obj
        if isinstance(obj, defer.Deferred):
            self._synchronous = True
            self._outstanding += 1
            try:
                obj.addCallbacks(self._show_result, self._show_failure)
                obj.addBoth(self._shown)
            finally:
                self._synchronous = False
        elif isinstance(obj, str):
            self._show_text(obj, is_async=False)  # shown now: the prompt follows it
        else:
            self.write(repr(obj) + "\n")

    def _show_text(self, text: str, is_async: bool | None = None) -> None:
        """Write ``text`` as one or more lines; output that comes later than its
        line (a Deferred's result) redraws the prompt after it."""
        if is_async is None:
            is_async = not self._synchronous
        self.write(text if text.endswith("\n") else text + "\n", is_async)

    def _show_result(self, result: object) -> object:
        if isinstance(result, str):
            self._show_text(result)
        elif result is not None:
            self._show_text(repr(result))
        return result

    def _show_failure(self, failure: Failure) -> None:
        self.failed = True
        self.handler.log_error(failure.value, failure)
        self._show_text(_one_line(cast(BaseException, failure.value)))

    def _shown(self, result: object) -> object:
        self._outstanding -= 1
        if not self._outstanding:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)
        return result


class AdminManhole(manhole.Manhole):
    """A manhole session for one admin on a terminal; every input line is logged
    (tokens masked)."""

    ps = (b"enclaves> ", b"... ")

    def __init__(self, namespace: dict[str, Any], identity: object) -> None:
        super().__init__(namespace)
        self.identity = identity

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = AdminInterpreter(self, self.namespace)
        self.terminal.write(
            b"Enclaves admin shell. Type help() for the commands, Ctrl-D to leave.\n"
        )
        self.terminal.write(self.ps[self.pn])

    def initializeScreen(self) -> None:
        # No terminal reset (it would clear the admin's screen) and no prompt
        # yet: connectionMade writes the banner first.
        self.setInsertMode()

    def lineReceived(self, line: bytes) -> None:
        log_typed_line(self.identity, line)
        super().lineReceived(line)

    def addOutput(self, data: Any, isAsync: bool | None = None) -> None:
        if self.terminal is not None:  # None once the session has ended
            super().addOutput(shown(data), isAsync)

    def log_error(self, error: BaseException, failure: Failure | None = None) -> None:
        log_unexpected(self.identity, error, failure)

    def handle_QUIT(self) -> None:
        """Ctrl-D (on an empty line): leave once every pending answer is shown
        (an ``issue()`` just typed still prints its token)."""
        self.leave()

    def leave(self) -> None:
        def close(_: object) -> None:
            if self.terminal is not None:
                self.terminal.loseConnection()

        cast(AdminInterpreter, self.interpreter).when_shown().addCallback(close)

    def connectionLost(self, reason: Failure) -> None:
        log.info("admin {admin} left the admin shell", admin=str(self.identity))
        super().connectionLost(reason)


class AdminLineShell(protocol.Protocol):
    """The admin shell without a terminal: for scripts (``ssh -T``, or a command).

    Input is read line by line; each line goes to the interpreter, and the
    next waits until the output of the one before (a Deferred's text
    included) has been written.  End of input (the client's EOF, or a
    Ctrl-D byte) ends the session once all of it is written: ``finish`` is
    called with exit status 0, or 1 if any command failed.  Output is plain
    text with ``newline`` line ends; no prompt, no banner, no escape
    sequences (control characters are escaped, see :func:`shown`).
    """

    def __init__(
        self,
        namespace: dict[str, Any],
        identity: object,
        finish: Callable[[int], None],
        *,
        newline: bytes = b"\n",
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._later: Any = None  # the next turn's share of waiting lines
        self.namespace = dict(namespace)
        self.identity = identity
        self._finish = finish
        self._newline = newline
        self._buffer = b""
        self._input_ended = False
        self._busy = False
        self._done = False
        self._lost = False
        self.interpreter = AdminInterpreter(self, self.namespace)

    def dataReceived(self, data: bytes) -> None:
        if self._input_ended:
            return
        data, marker, _ = data.partition(END_OF_INPUT)
        end = bool(marker)
        self._buffer += data
        if len(self._buffer) > MAX_PENDING_INPUT:
            # Commands typed ahead of a slow answer are fine; megabytes are not.
            self._buffer = b""
            self.interpreter.failed = True
            self.addOutput(
                f"error: more than {MAX_PENDING_INPUT} bytes of input waiting; "
                "the rest of the input is ignored\n"
            )
            end = True
        if end:
            self._input_ended = True
        self._run()

    def leave(self) -> None:
        """``exit()``: no more input is read; the session ends as at end of input."""
        self._input_ended = True
        self._buffer = b""

    def end_of_input(self) -> None:
        """The client will send no more (SSH EOF)."""
        self._input_ended = True
        self._run()

    def _run(self) -> None:
        if self._later is not None:
            return  # a share of lines is already scheduled
        ran = 0
        while not (self._busy or self._done or self._lost):
            line, newline, rest = self._buffer.partition(b"\n")
            if newline or (self._input_ended and self._buffer):
                if ran == LINES_PER_TURN:
                    # Let the reactor serve the users between shares.
                    self._later = self._clock.callLater(0, self._next_share)
                    return
                self._buffer = rest
                self._run_line(line.rstrip(b"\r"))
                ran += 1
            elif self._input_ended:
                self._end()
            else:
                return

    def _next_share(self) -> None:
        self._later = None
        self._run()

    def _run_line(self, line: bytes) -> None:
        log_typed_line(self.identity, line)
        # The interpreter decodes strictly; a stray byte is the admin's typo, not a crash.
        self.interpreter.push(line.decode("utf-8", "replace").encode("utf-8"))
        if self.interpreter.outstanding:
            self._busy = True
            self.interpreter.when_shown().addCallback(self._resume)

    def _resume(self, _: object) -> None:
        self._busy = False
        self._run()

    def _end(self) -> None:
        if self.interpreter.buffer:
            # An unfinished statement at the end: a blank line completes a
            # block; anything still open (a bracket) is an error.
            if self.interpreter.push(b""):
                self.interpreter.resetBuffer()
                self.interpreter.failed = True
                self.addOutput("error: the input ended inside a statement\n")
            if self.interpreter.outstanding:
                self._busy = True
                self.interpreter.when_shown().addCallback(self._resume)
                return
        self._done = True
        self._finish(1 if self.interpreter.failed else 0)

    def addOutput(self, data: Any, isAsync: bool | None = None) -> None:
        if self._lost or not data:
            return
        data = shown(data if isinstance(data, bytes) else str(data)).encode("utf-8")
        if self._newline != b"\n":
            data = data.replace(b"\n", self._newline)
        self.transport.write(data)  # type: ignore[union-attr]

    def log_error(self, error: BaseException, failure: Failure | None = None) -> None:
        log_unexpected(self.identity, error, failure)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self._lost:
            self._lost = True
            log.info("admin {admin} left the admin shell", admin=str(self.identity))
