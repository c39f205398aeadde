"""Enrollment tokens (DESIGN.md §6): ``enclaves1:`` + base64url(id || K_u)
[+ ``@host:port`` or ``@tls:host:port``]."""

from __future__ import annotations

import base64
import binascii
import struct

from attrs import field, frozen

from enclaves.crypto import KeyPair

__all__ = ["PREFIX", "EnrollmentToken", "TokenError", "parse_token"]

PREFIX = "enclaves1:"


class TokenError(ValueError):
    """A string that is not a well-formed enrollment token; never echoes the token."""


@frozen
class EnrollmentToken:
    """A newcomer's user id and first key pair, and optionally where the server is."""

    user_id: int
    keys: KeyPair = field(repr=False)
    address: str | None = None

    def __str__(self) -> str:
        raw = struct.pack(">Q", self.user_id) + self.keys.to_bytes()
        text = PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        return f"{text}@{self.address}" if self.address else text

    def __repr__(self) -> str:
        return f"EnrollmentToken(user_id={self.user_id}, address={self.address!r})"


def parse_token(text: str) -> EnrollmentToken:
    """Parse a token as printed by ``issue()`` or INVITE."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise TokenError(f"an enrollment token starts with {PREFIX!r}")
    body, _, address = text[len(PREFIX) :].partition("@")
    if len(body) != 96:  # 72 bytes in unpadded base64
        raise TokenError("the enrollment token is damaged (wrong length)")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("the enrollment token is damaged (not base64url)") from None
    if len(raw) != 72 or "+" in body or "/" in body:
        raise TokenError("the enrollment token is damaged")
    (user_id,) = struct.unpack_from(">Q", raw)
    if user_id == 0:
        raise TokenError("the enrollment token names user 0, which is the server")
    try:
        keys = KeyPair.from_bytes(raw[8:])
    except ValueError:
        raise TokenError("the enrollment token holds an invalid key pair") from None
    where = address.removeprefix("tls:")
    if address and (":" not in where or not where.rpartition(":")[2].isdigit()):
        raise TokenError("the address after @ must be host:port or tls:host:port")
    return EnrollmentToken(user_id, keys, address or None)
