"""Line editing on a terminal: the sans-IO editor, and TerminalIO between the
terminal and a real LineUI (docs/client.rst, "Typing")."""

from __future__ import annotations

import os
import re
import termios
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from enclaves.client.terminal import (
    HISTORY,
    MAX_LINE,
    CharacterMode,
    EndOfInput,
    LineEditor,
    Submit,
    TerminalIO,
)
from enclaves.client.ui import LineUI
from tests.client.helpers import keyed_app

A, B = 1001, 2002
LEFT, RIGHT, UP, DOWN = "\x1b[D", "\x1b[C", "\x1b[A", "\x1b[B"
HOME, END, DELETE = "\x1b[H", "\x1b[F", "\x1b[3~"


def typed(keys: str) -> LineEditor:
    editor = LineEditor()
    editor.feed(keys)
    return editor


# -- the editor -------------------------------------------------------------------


def test_enter_submits_the_line_and_starts_an_empty_one() -> None:
    editor = LineEditor()
    assert editor.feed("hello") == []
    assert editor.feed("\r") == [Submit("hello")]
    assert (editor.text, editor.cursor) == ("", 0)
    # CR LF (a pasted line, some terminals) is one Enter; LF alone is one too.
    assert editor.feed("a\r\nb\nc\r\r") == [Submit("a"), Submit("b"), Submit("c"), Submit("")]


@pytest.mark.parametrize(
    ("keys", "text", "cursor"),
    [
        ("abc" + LEFT + LEFT + "X", "aXbc", 2),
        ("abc" + HOME + "X" + END + "Y", "XabcY", 5),
        ("abc\x01X\x05Y", "XabcY", 5),  # ^A ^E
        ("abc\x02\x02\x06X", "abXc", 3),  # ^B ^B ^F
        ("abc\x7f", "ab", 2),  # Backspace (DEL)
        ("abc\x08", "ab", 2),  # Backspace (^H)
        ("abc" + HOME + DELETE, "bc", 0),
        ("abc" + HOME + "\x04", "bc", 0),  # ^D deletes on a non-empty line
        ("abc" + LEFT + "\x15", "c", 0),  # ^U: kill to the start
        ("abc" + LEFT + LEFT + "\x0b", "a", 1),  # ^K: kill to the end
        ("one two  \x17", "one ", 4),  # ^W: the word before the cursor
        ("x" + LEFT * 5 + "\x7f" + RIGHT * 5, "x", 1),  # moves stop at the ends
        ("a\tb", "a b", 3),
        ("a\x1bxb", "ab", 2),  # Alt+x: ignored
        ("a\x1b[99Zb", "ab", 2),  # an unknown sequence: ignored
        ("a\x1bOHb", "ba", 1),  # SS3 Home
        ("a\x00\x07\x1cb", "ab", 2),  # other control characters: ignored
        ("a\u200bb", "a\u200bb", 3),  # a format character is kept (shown as ?)
    ],
)
def test_keys(keys: str, text: str, cursor: int) -> None:
    editor = typed(keys)
    assert (editor.text, editor.cursor) == (text, cursor)


def test_an_escape_sequence_split_across_reads() -> None:
    editor = LineEditor()
    for part in ("ab", "\x1b", "[", "D", "X"):
        editor.feed(part)
    assert (editor.text, editor.cursor) == ("aXb", 2)


def test_end_of_input_only_on_an_empty_line() -> None:
    editor = LineEditor()
    assert editor.feed("\x04") == [EndOfInput()]
    assert editor.feed("ab\x04") == []


def test_history_recalls_lines_and_keeps_the_draft() -> None:
    editor = LineEditor()
    editor.feed("/contacts\r/msg bob hi\r/msg bob hi\r   \r")
    assert editor.history == ["/contacts", "/msg bob hi"]  # no repeats, no blanks
    editor.feed("draft")
    editor.feed(UP)
    assert editor.text == "/msg bob hi"
    editor.feed(UP + UP)  # stops at the oldest
    assert editor.text == "/contacts"
    editor.feed("\x0e")  # ^N
    assert (editor.text, editor.cursor) == ("/msg bob hi", 11)
    editor.feed(DOWN)
    assert editor.text == "draft"
    editor.feed(DOWN)
    assert editor.text == "draft"
    editor.feed("\x10" + " edited\r")  # ^P, then edit the recalled line
    assert editor.history[-1] == "/msg bob hi edited"
    assert editor.history[:2] == ["/contacts", "/msg bob hi"]


def test_history_and_line_length_are_bounded() -> None:
    editor = LineEditor()
    editor.feed("".join(f"line {i}\r" for i in range(HISTORY + 10)))
    assert len(editor.history) == HISTORY and editor.history[0] == "line 10"
    editor.feed("x" * (MAX_LINE + 5))
    assert len(editor.text) == MAX_LINE


def test_render_draws_prompt_line_and_cursor() -> None:
    editor = typed("hello" + LEFT)
    assert editor.render("> ", 80) == "\r> hello\x1b[K\r\x1b[6C"
    assert typed("").render("", 80) == "\r\x1b[K\r"


def test_render_scrolls_a_long_line_to_keep_the_cursor_in_view() -> None:
    editor = typed("0123456789" * 10)
    out = editor.render("> ", 40)
    visible = out.split("\x1b[K")[0][len("\r> ") :]
    assert len(visible) == 40 - 2 - 2  # room for the cursor after the last one
    assert visible == editor.text[-len(visible) :]
    assert out.endswith("\r\x1b[38C")
    editor.feed(HOME)
    out = editor.render("> ", 40)
    assert out.startswith("\r> 0123456789") and out.endswith("\r\x1b[2C")


def test_render_counts_wide_characters_twice() -> None:
    editor = typed("日本")
    assert editor.render("> ", 80).endswith("\r\x1b[6C")


def test_render_never_draws_a_control_character_that_was_typed_or_pasted() -> None:
    editor = typed("a\u202eb\u200bc")  # right-to-left override, zero-width space
    assert editor.render("> ", 80) == "\r> a?b?c\x1b[K\r\x1b[7C"


OUR_SEQUENCES = re.compile(r"\x1b\[K|\x1b\[\d+C|\r")


@given(st.lists(st.text(max_size=30), max_size=12), st.integers(1, 300))
def test_any_keys_in_any_reads_never_crash_and_draw_nothing_foreign(
    reads: list[str], width: int
) -> None:
    editor = LineEditor()
    for text in reads:
        editor.feed(text)
        assert 0 <= editor.cursor <= len(editor.buffer) <= MAX_LINE
        drawn = OUR_SEQUENCES.sub("", editor.render("> ", width))
        assert not any(unicodedata.category(ch) == "Cc" for ch in drawn)


KEYS = list("ab \r\n\x7f\x01\x05\x15\x17\x1b[OACDH3~")


@given(st.text(alphabet=st.sampled_from(KEYS), max_size=60), st.data())
def test_how_the_keys_are_split_into_reads_does_not_matter(keys: str, data: st.DataObject) -> None:
    whole = LineEditor()
    events = whole.feed(keys)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(keys)), max_size=6)))
    split = LineEditor()
    split_events = []
    for start, end in zip([0, *cuts], [*cuts, len(keys)], strict=True):
        split_events += split.feed(keys[start:end])
    # A sequence cut off at the very end waits for more in both.
    assert (split_events, split.text, split.cursor) == (events, whole.text, whole.cursor)


# -- TerminalIO with a real LineUI --------------------------------------------------


@pytest.fixture
def term(tmp_path: Path) -> tuple[TerminalIO, LineUI, StringTransport]:
    eof: list[bool] = []
    ui = LineUI(on_eof=lambda: eof.append(True))
    terminal = TerminalIO(ui, ui.prompt, lambda: 80)
    transport = StringTransport()
    terminal.makeConnection(transport)
    keyed_app(tmp_path, ui, A, B)
    ui.eof = eof  # type: ignore[attr-defined]
    return terminal, ui, transport


def screen(transport: StringTransport) -> str:
    out = transport.value().decode()
    transport.clear()
    return out


def test_output_goes_above_the_line_being_typed(term) -> None:
    terminal, ui, transport = term
    assert screen(transport) == "\r> \x1b[K\r\x1b[2C"
    terminal.dataReceived(b"half a li")
    screen(transport)
    ui.line("msg", "bob: hello")
    assert screen(transport) == "\r\x1b[K[msg] bob: hello\r\n\r> half a li\x1b[K\r\x1b[11C"


def test_a_typed_line_reaches_the_ui_and_stays_on_the_screen(term) -> None:
    terminal, _ui, transport = term
    terminal.dataReceived(f"/name {B} bob\r/to bob\r".encode())
    out = screen(transport)
    assert f"\r\x1b[K> /name {B} bob\r\n" in out
    assert f"[info] {B} is now called bob" in out
    assert "[info] talking to bob" in out
    assert out.endswith("\r\n\rbob> \x1b[K\r\x1b[5C")
    assert out.count("\rbob> ") == 1  # drawn once, after the read
    terminal.dataReceived(b"hi\r")
    assert screen(transport).endswith("\ryes/no> \x1b[K\r\x1b[8C")  # unverified: asks
    terminal.dataReceived("y\xc3".encode("latin-1"))  # a character cut in two reads
    terminal.dataReceived(b"\xa9s\r")
    assert "[info] not sent" in screen(transport)  # "yés" is not yes


def test_control_d_on_an_empty_line_is_the_end_of_input(term) -> None:
    terminal, ui, _ = term
    terminal.dataReceived(b"ab\x04")
    assert ui.eof == []  # type: ignore[attr-defined]
    terminal.dataReceived(b"\x15\x04")
    assert ui.eof == [True]  # type: ignore[attr-defined]


def test_after_the_end_of_input_no_prompt_is_drawn_and_no_key_read(term) -> None:
    """^D while the client still finishes (waiting for the server, say): the
    prompt goes and is not drawn again under later output lines."""
    terminal, ui, transport = term
    screen(transport)
    terminal.dataReceived(b"\x04")
    assert ui.eof == [True]  # type: ignore[attr-defined]
    assert screen(transport).endswith("\r\x1b[K")
    ui.line("conn", "cannot reach the server; retrying in 2 s")
    out = screen(transport)
    assert out == "\r\x1b[K[conn] cannot reach the server; retrying in 2 s\r\n", out
    terminal.dataReceived(b"typed after\r\x04")
    assert screen(transport) == "" and ui.eof == [True]  # type: ignore[attr-defined]


def test_closing_clears_the_input_line_and_closes_standard_output(term) -> None:
    terminal, ui, transport = term
    terminal.dataReceived(b"unsent")
    screen(transport)
    closed = ui.close()
    assert screen(transport) == "\r\x1b[K"
    assert transport.disconnecting
    terminal.connectionLost(None)
    assert closed.called


# -- the terminal's mode ----------------------------------------------------------


def test_character_mode_turns_off_echo_and_lines_and_restores_them() -> None:
    controller, tty = os.openpty()
    try:
        before = termios.tcgetattr(tty)
        mode = CharacterMode(tty)
        mode.enter()
        now = termios.tcgetattr(tty)
        assert not now[3] & (termios.ICANON | termios.ECHO | termios.IEXTEN)
        assert now[3] & termios.ISIG  # ^C and ^Z still signal
        mode.enter()  # again (after ^Z and fg): what is restored is the first state
        mode.restore()
        assert termios.tcgetattr(tty) == before
        mode.restore()
    finally:
        os.close(controller)
        os.close(tty)


def test_a_redraw_looks_at_a_screenful_not_the_whole_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pasted 64 KiB line must not make each redraw walk the line (it was
    quadratic: minutes for one redraw, the reactor blocked meanwhile)."""
    import enclaves.client.terminal as terminal

    editor = typed("x" * MAX_LINE)
    calls = 0
    real = terminal.cell_width

    def counting(ch: str) -> int:
        nonlocal calls
        calls += 1
        if calls > 10 * 80:  # fail at once rather than after minutes
            raise AssertionError(f"{calls} characters measured for one redraw")
        return real(ch)

    monkeypatch.setattr(terminal, "cell_width", counting)
    for keys in ("", HOME, END, LEFT * 3, UP):
        editor.feed(keys)
        calls = 0
        editor.render("> ", 80)


def test_prompt_and_echoed_line_never_carry_control_characters(term) -> None:
    terminal, ui, transport = term
    ui.app.core.set_petname(B, "b\x1b[2Jx")  # a name typed through a pipe
    terminal.dataReceived(f"/to {B}\r".encode())
    out = screen(transport)
    assert "\x1b[2J" not in out and "b\\x1b[2Jx> " in out
    terminal.dataReceived("a\u202eb\r".encode())
    assert "\u202e" not in screen(transport)


def test_a_long_prompt_is_cut_to_fit_a_narrow_terminal() -> None:
    terminal = TerminalIO(LineUI(), lambda: "a-very-long-petname-indeed> ", lambda: 24)
    transport = StringTransport()
    terminal.makeConnection(transport)
    drawn = transport.value().decode()
    assert drawn == "\ra-very> \x1b[K\r\x1b[8C"
