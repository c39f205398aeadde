"""Line editing for the chat client on a terminal (docs/client.rst, "Typing").

``LineEditor`` is the sans-IO part: keys in, submitted lines out, and the
escape sequence that redraws the line being typed.  ``TerminalIO`` sits
between ``StandardIO`` and the ``LineUI``: it keeps the line being typed at
the bottom of the screen and prints the UI's output lines above it, so a
message that arrives while you type never breaks your line.
``CharacterMode`` switches the terminal to reading key by key without echo
(^C and ^Z still signal) and back.
"""

from __future__ import annotations

import codecs
import termios
import unicodedata
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

__all__ = ["CharacterMode", "EndOfInput", "LineEditor", "Submit", "TerminalIO"]

MAX_LINE = 64 * 1024  # characters; more is refused (as LineUI.MAX_LENGTH refuses bytes)
HISTORY = 500  # lines kept, in memory only


@frozen
class Submit:
    """Enter was pressed: ``line`` is what was typed."""

    line: str


@frozen
class EndOfInput:
    """^D on an empty line."""


Event = Submit | EndOfInput

_CSI_KEYS = {
    "A": "up", "B": "down", "C": "right", "D": "left", "H": "home", "F": "end",
    "1~": "home", "7~": "home", "4~": "end", "8~": "end", "3~": "delete",
}  # fmt: skip
_CONTROL_KEYS = {
    "\x01": "home", "\x02": "left", "\x04": "eof-or-delete", "\x05": "end",
    "\x06": "right", "\x08": "backspace", "\x0b": "kill-end", "\x0e": "down",
    "\x10": "up", "\x15": "kill-start", "\x17": "kill-word", "\x7f": "backspace",
}  # fmt: skip


def cell_width(ch: str) -> int:
    """Terminal columns ``ch`` takes as the editor shows it."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def shown(ch: str) -> str:
    """``ch`` as drawn in the input line: control and format characters as ``?``."""
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co"):
        return "?"
    return ch


class LineEditor:
    """The line being typed, its cursor and an in-memory history."""

    def __init__(self) -> None:
        self.buffer: list[str] = []
        self.cursor = 0
        self.history: list[str] = []
        self._recalled: int | None = None  # index into history while browsing it
        self._draft: list[str] = []  # the unfinished line, kept while browsing
        self._escape = ""  # an escape sequence cut off at the end of a read
        self._after_cr = False
        self._scroll = 0  # first character shown when the line is wider than the screen

    @property
    def text(self) -> str:
        return "".join(self.buffer)

    def feed(self, text: str) -> list[Event]:
        """Apply typed keys; returns the lines submitted and the end of input."""
        events: list[Event] = []
        text, self._escape = self._escape + text, ""
        i = 0
        while i < len(text):
            ch = text[i]
            i += 1
            after_cr, self._after_cr = self._after_cr, False
            if ch == "\x1b":
                end = _escape_end(text, i)
                if end is None:  # cut off: wait for the rest
                    self._escape = text[i - 1 :]
                    break
                self._key(_CSI_KEYS.get(text[i + 1 : end], "") if text[i] in "[O" else "")
                i = end
            elif ch in "\r\n":
                if ch == "\n" and after_cr:
                    continue  # CR LF is one Enter
                self._after_cr = ch == "\r"
                events.append(Submit(self._submit()))
            elif ch == "\x04" and not self.buffer:
                events.append(EndOfInput())
            elif ch in _CONTROL_KEYS:
                self._key(_CONTROL_KEYS[ch])
            elif ch == "\t":
                self._insert(" ")
            elif unicodedata.category(ch) not in ("Cc", "Cs"):
                self._insert(ch)
        return events

    def render(self, prompt: str, width: int) -> str:
        """Escape sequence redrawing ``prompt`` and the visible part of the line,
        with the terminal's cursor at the editor's."""
        room = max(width - _width(prompt) - 1, 8)
        if self.cursor < self._scroll:
            self._scroll = self.cursor
        # The first character that still lets the cursor's column fit: walk
        # back from the cursor (bounded by the screen's width, not the line's).
        start, used = self.cursor, 0
        while start > self._scroll and used + cell_width(self.buffer[start - 1]) <= room - 1:
            start -= 1
            used += cell_width(self.buffer[start])
        self._scroll = start
        visible: list[str] = []
        used = 0
        for ch in self.buffer[self._scroll :]:
            used += cell_width(ch)
            if used > room:
                break
            visible.append(shown(ch))
        column = _width(prompt) + _width(self.buffer[self._scroll : self.cursor])
        move = f"\x1b[{column}C" if column else ""
        return f"\r{prompt}{''.join(visible)}\x1b[K\r{move}"

    # -- keys ---------------------------------------------------------------------

    def _insert(self, ch: str) -> None:
        if len(self.buffer) < MAX_LINE:
            self.buffer.insert(self.cursor, ch)
            self.cursor += 1

    def _key(self, key: str) -> None:
        buffer, cursor = self.buffer, self.cursor
        if key == "left":
            self.cursor = max(cursor - 1, 0)
        elif key == "right":
            self.cursor = min(cursor + 1, len(buffer))
        elif key == "home":
            self.cursor = 0
        elif key == "end":
            self.cursor = len(buffer)
        elif key == "backspace" and cursor:
            del buffer[cursor - 1]
            self.cursor -= 1
        elif key in ("delete", "eof-or-delete") and cursor < len(buffer):
            del buffer[cursor]
        elif key == "kill-start":
            del buffer[:cursor]
            self.cursor = 0
        elif key == "kill-end":
            del buffer[cursor:]
        elif key == "kill-word":
            start = cursor
            while start and buffer[start - 1] == " ":
                start -= 1
            while start and buffer[start - 1] != " ":
                start -= 1
            del buffer[start:cursor]
            self.cursor = start
        elif key == "up":
            self._browse(-1)
        elif key == "down":
            self._browse(+1)

    def _browse(self, step: int) -> None:
        if not self.history:
            return
        if self._recalled is None:
            if step > 0:
                return
            self._draft = self.buffer
            position = len(self.history) - 1
        else:
            position = self._recalled + step
        if position < 0:
            return
        if position >= len(self.history):
            self._recalled, self.buffer = None, self._draft
        else:
            self._recalled, self.buffer = position, list(self.history[position])
        self.cursor = len(self.buffer)

    def _submit(self) -> str:
        line = self.text
        if line.strip() and (not self.history or self.history[-1] != line):
            self.history.append(line)
            del self.history[:-HISTORY]
        self.buffer, self.cursor, self._scroll = [], 0, 0
        self._recalled, self._draft = None, []
        return line


def _escape_end(text: str, i: int) -> int | None:
    """End of the escape sequence whose ESC is at ``i - 1``; None if cut off."""
    if i >= len(text):
        return None
    if text[i] == "O":  # SS3: one more character
        return i + 2 if i + 1 < len(text) else None
    if text[i] != "[":
        return i + 1  # Alt + key: ignored
    j = i + 1
    while j < len(text):
        if "\x40" <= text[j] <= "\x7e":
            return j + 1
        if not "\x20" <= text[j] <= "\x3f" or j - i > 32:
            return j  # not a CSI sequence after all: drop what came so far
        j += 1
    return None


def _fit(prompt: str, width: int) -> str:
    """``prompt`` cut to a third of the screen (a long name on a narrow
    terminal would wrap, and each redraw would leave debris)."""
    most = max(width // 3, 3)
    if _width(prompt) <= most:
        return prompt
    cut: list[str] = []
    for ch in prompt:
        if _width(cut) + cell_width(ch) > most - 2:
            break
        cut.append(shown(ch))
    return "".join(cut) + "> "


def _width(chars: Any) -> int:
    return sum(cell_width(ch) for ch in chars)


class _UITransport:
    """What the LineUI writes to: lines go above the input line."""

    def __init__(self, terminal: TerminalIO) -> None:
        self._terminal = terminal
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._terminal.show(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._terminal.show(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._terminal.finish()


@implementer(IHalfCloseableProtocol)
class TerminalIO(Protocol):
    """Keys from the terminal to a ``LineEditor``; whole lines to ``ui``; the
    ``ui``'s output printed above the line being typed."""

    def __init__(self, ui: Any, prompt: Callable[[], str], width: Callable[[], int]) -> None:
        self.ui = ui
        self.editor = LineEditor()
        self._prompt = prompt
        self._width = width
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finished = False  # the input line is gone for good
        self._input_ended = False  # ^D: no prompt and no more keys, output still shown
        self._reading = False

    def connectionMade(self) -> None:
        self.ui.makeConnection(_UITransport(self))
        self.redraw()

    def dataReceived(self, data: bytes) -> None:
        if self._input_ended:
            return  # after ^D the client is only finishing: keys are not read
        self._reading = True  # one redraw at the end, not one per output line
        try:
            for event in self.editor.feed(self._decoder.decode(data)):
                if isinstance(event, Submit):
                    # Leave what was typed on the screen, as a terminal would.
                    self._write(self._line_shown(event.line) + "\r\n")
                    self.ui.lineReceived(event.line.encode("utf-8"))
                else:
                    self._write("\r\x1b[K")  # the prompt goes: no more input is read
                    self._input_ended = True
                    self.ui.readConnectionLost()
                    return
                if self.finished:
                    return
        finally:
            self._reading = False
        self.redraw()

    def show(self, data: bytes) -> None:
        """Output lines from the UI, above the input line, which is then redrawn."""
        if self.transport is None:
            return
        self.transport.write(b"\r\x1b[K" + data.replace(b"\n", b"\r\n"))
        if not self._reading:
            self.redraw()

    def redraw(self) -> None:
        if self.transport is not None and not self.finished and not self._input_ended:
            width = self._width()
            self._write(self.editor.render(_fit(self._prompt(), width), width))

    def finish(self) -> None:
        """The UI closes: clear the input line, then close standard output."""
        if self.finished or self.transport is None:
            return
        self.finished = True
        self._write("\r\x1b[K")
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.ui.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.ui.writeConnectionLost()  # the terminal is gone

    def connectionLost(self, reason: Any = None) -> None:
        self.ui.connectionLost(reason)

    def _line_shown(self, line: str) -> str:
        prompt = _fit(self._prompt(), self._width())
        return "\r\x1b[K" + prompt + "".join(shown(ch) for ch in line)

    def _write(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(text.encode("utf-8"))


class CharacterMode:
    """The terminal on ``fd`` read key by key without echo; :meth:`restore`
    (idempotent) puts back the settings found."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def enter(self) -> None:
        saved = termios.tcgetattr(self.fd)
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        if self._saved is None:
            self._saved = saved

    def restore(self) -> None:
        if self._saved is not None:
            try:
                # TCSANOW: output is not held back by this change, and waiting
                # for it to drain could hang the exit after a ^S.
                termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            except termios.error:
                pass  # the terminal is gone
