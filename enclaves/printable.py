"""Text made safe to write to a terminal or a log: control characters escaped.

Whatever a peer (an SSH client, an admin's typed line) can put in a log line
or in the admin shell's output goes through :func:`printable`, so that an
escape sequence cannot recolour, retitle or rewrite the admin's terminal,
and a carriage return or newline cannot forge a log line.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Unicode general categories escaped: control, format, line and paragraph
# separators, surrogates, private use.
_ESCAPED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})

# Format characters that are part of ordinary text and can neither reorder
# nor hide it: the zero-width non-joiner (Persian, Indic scripts) and joiner
# (emoji sequences such as a family).
_TEXT_FORMAT = frozenset("\u200c\u200d")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, keep: str = "") -> str:
    """``text`` with every control, format, private-use and line- or
    paragraph-separator character written as Python's ``repr`` writes it
    (``\\x1b``, ``\\n``, ``\\u202e``), except those in ``keep``.

    Escaped are the C0 and C1 control characters (ESC, BEL, CR, newline,
    tab, DEL, ...), format characters such as the bidirectional overrides
    and the zero-width space, line and paragraph separators, surrogates and
    private-use characters.  Letters, digits, punctuation, symbols and spaces
    of any script stay, and so do backslashes and the zero-width (non-)joiner
    that Persian text and emoji sequences need.
    """
    if text.isprintable():
        return text  # the common case; isprintable() is the stricter test
    return "".join(
        _escape(c)
        if c not in keep and c not in _TEXT_FORMAT and unicodedata.category(c) in _ESCAPED
        else c
        for c in text
    )
