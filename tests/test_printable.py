"""Escaping control characters for the terminal and the log."""

from __future__ import annotations

import pytest

from enclaves.printable import printable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, é ü 漢字 ✓", "plain text, é ü 漢字 ✓"),
        ("\x1b[31mRED\x1b[0m", "\\x1b[31mRED\\x1b[0m"),
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
        ("a\rb\nc\td", "a\\rb\\nc\\td"),
        ("\x7f\x9b\x00", "\\x7f\\x9b\\x00"),
        ("abc\u202edef", "abc\\u202edef"),
        ("\U000e0041", "\\U000e0041"),
        ("back\\slash", "back\\slash"),
        # Spaces of other scripts are text, not controls.
        ("a\u00a0b\u202fc", "a\u00a0b\u202fc"),
        # Joiners are text (Persian, emoji families); a zero-width space is not.
        (
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
        ),
        (
            "\U0001f468\u200d\U0001f469\u200d\U0001f467",
            "\U0001f468\u200d\U0001f469\u200d\U0001f467",
        ),
        ("a\u200bb", "a\\u200bb"),
        ("\ue000\u2028", "\\ue000\\u2028"),
    ],
)
def test_control_characters_escaped_like_repr(text: str, expected: str) -> None:
    assert printable(text) == expected


def test_kept_characters_stay() -> None:
    assert printable("one\ntwo\tthree\x1b", keep="\n\t") == "one\ntwo\tthree\\x1b"


def test_docs_name_what_is_escaped_not_isprintable() -> None:
    """docs/admin.rst once said whatever ``str.isprintable`` refuses is
    escaped; spaces of other scripts are refused by it, yet kept."""
    from pathlib import Path

    assert not "\u00a0".isprintable() and printable("\u00a0") == "\u00a0"
    docs = " ".join((Path(__file__).parent.parent / "docs" / "admin.rst").read_text().split())
    assert "isprintable" not in docs
    assert "(a no-break space included) are written as they are" in docs
