"""Enrollment token format (DESIGN.md §6)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaves.crypto import KeyPair
from enclaves.token import EnrollmentToken, TokenError, parse_token


def test_round_trip_and_layout() -> None:
    keys = KeyPair(bytes(range(32)), bytes(range(32, 64)))
    token = EnrollmentToken(1, keys)
    text = str(token)
    assert text == (
        "enclaves1:AAAAAAAAAAEAAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8w"
        "MTIzNDU2Nzg5Ojs8PT4_"
    )
    assert parse_token(text) == token
    assert parse_token(text + "@chat.example:7500").address == "chat.example:7500"
    assert parse_token(text + "@tls:chat.example:7500").address == "tls:chat.example:7500"
    assert "AAAA" not in repr(token)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "enclaves2:AAAA",
        "enclaves1:" + "A" * 95,
        "enclaves1:" + "A" * 96,  # user id 0
        "enclaves1:" + "!" * 96,
        "enclaves1:" + "A" * 10 + "B" + "A" * 85 + "@nohost",
        "enclaves1:" + "A" * 10 + "B" + "A" * 85 + "@tls:nohost",
        "enclaves1:" + "A" * 10 + "B" + "A" * 85 + "@tls:7500",
    ],
)
def test_bad_tokens(text: str) -> None:
    with pytest.raises(TokenError) as error:
        parse_token(text)
    assert text[10:30] not in str(error.value) or not text[10:30]


@given(st.text(max_size=200))
def test_parser_never_raises_anything_else(text: str) -> None:
    try:
        parse_token(text)
    except TokenError:
        pass
