"""Sans-IO codec for end-to-end blobs (docs/protocol.rst, "End-to-end messages").

Every e2e blob starts with ``u8 kind``: 0x01 MESSAGE, 0x02 OFFER, 0x03 ACCEPT.
OFFER and ACCEPT are fixed width; MESSAGE is ``u32 epoch`` then a sealed box
that only the pair keys of that epoch open.  :func:`parse_blob` dispatches on
the kind byte and raises only :class:`BlobError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from attrs import field, frozen

__all__ = [
    "BlobKind",
    "BlobError",
    "Offer",
    "Accept",
    "MessageBlob",
    "E2EBlob",
    "parse_blob",
    "X25519_SIZE",
    "PQ_PUBLIC_SIZE",
    "PQ_CT_SIZE",
    "CONFIRM_SIZE",
    "OFFER_SIZE",
    "ACCEPT_SIZE",
    "MAX_EPOCH",
]

X25519_SIZE = 32
PQ_PUBLIC_SIZE = 1184  # ML-KEM-768 encapsulation key
PQ_CT_SIZE = 1088  # ML-KEM-768 ciphertext
CONFIRM_SIZE = 16
MAX_EPOCH = 0xFFFFFFFF
_U32 = struct.Struct(">I")
OFFER_SIZE = 1 + 4 + X25519_SIZE + X25519_SIZE + PQ_PUBLIC_SIZE  # 1253
ACCEPT_SIZE = 1 + 4 + X25519_SIZE + X25519_SIZE + PQ_CT_SIZE + CONFIRM_SIZE  # 1173
_MIN_SEALED = 48  # IV, one block, tag


class BlobKind(enum.IntEnum):
    MESSAGE = 0x01
    OFFER = 0x02
    ACCEPT = 0x03


class BlobError(Exception):
    """A malformed e2e blob.  The text names the defect, never any content."""


def _sized(size: int) -> Callable[[object, object, bytes], None]:
    def check(_inst: object, _attr: object, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"expected {size} bytes")

    return check


def _epoch(_inst: object, _attr: object, value: int) -> None:
    if not 0 <= value <= MAX_EPOCH:
        raise ValueError("epoch out of range")


def _short(value: bytes) -> str:
    return value[:4].hex() + "…"


@frozen
class Offer:
    """``0x02 || u32 epoch || IK_A[32] || EK_A[32] || PQ_A[1184]``: all public values."""

    epoch: int = field(validator=_epoch)
    ik: bytes = field(validator=_sized(X25519_SIZE), repr=_short)
    ek: bytes = field(validator=_sized(X25519_SIZE), repr=_short)
    pq: bytes = field(validator=_sized(PQ_PUBLIC_SIZE), repr=_short)

    def to_bytes(self) -> bytes:
        return bytes([BlobKind.OFFER]) + _U32.pack(self.epoch) + self.ik + self.ek + self.pq


@frozen
class Accept:
    """``0x03 || u32 epoch || IK_B[32] || EK_B[32] || ct[1088] || confirm[16]``."""

    epoch: int = field(validator=_epoch)
    ik: bytes = field(validator=_sized(X25519_SIZE), repr=_short)
    ek: bytes = field(validator=_sized(X25519_SIZE), repr=_short)
    ct: bytes = field(validator=_sized(PQ_CT_SIZE), repr=_short)
    confirm: bytes = field(validator=_sized(CONFIRM_SIZE), repr=_short)

    def to_bytes(self) -> bytes:
        return (
            bytes([BlobKind.ACCEPT])
            + _U32.pack(self.epoch)
            + self.ik
            + self.ek
            + self.ct
            + self.confirm
        )


@frozen
class MessageBlob:
    """``0x01 || u32 epoch || sealed``; ``sealed`` is opened by :mod:`enclaves.client.e2e`."""

    epoch: int = field(validator=_epoch)
    sealed: bytes = field(repr=lambda b: f"<{len(b)} bytes>")

    def to_bytes(self) -> bytes:
        return bytes([BlobKind.MESSAGE]) + _U32.pack(self.epoch) + self.sealed


E2EBlob = MessageBlob | Offer | Accept


def parse_blob(data: bytes) -> E2EBlob:
    """Decode any e2e blob by its kind byte; every defect is :class:`BlobError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BlobError("an e2e blob must be bytes")
    data = bytes(data)
    if len(data) < 5:
        raise BlobError("e2e blob too short")
    kind = data[0]
    (epoch,) = _U32.unpack_from(data, 1)
    if kind == BlobKind.MESSAGE:
        sealed = data[5:]
        if len(sealed) < _MIN_SEALED or (len(sealed) - 16) % 16:
            raise BlobError("malformed MESSAGE")
        return MessageBlob(epoch, sealed)
    if kind == BlobKind.OFFER:
        if len(data) != OFFER_SIZE:
            raise BlobError("OFFER has the wrong size")
        pos = 5
        ik = data[pos : pos + 32]
        ek = data[pos + 32 : pos + 64]
        pq = data[pos + 64 :]
        return Offer(epoch, ik, ek, pq)
    if kind == BlobKind.ACCEPT:
        if len(data) != ACCEPT_SIZE:
            raise BlobError("ACCEPT has the wrong size")
        pos = 5
        ik = data[pos : pos + 32]
        ek = data[pos + 32 : pos + 64]
        ct = data[pos + 64 : pos + 64 + PQ_CT_SIZE]
        confirm = data[pos + 64 + PQ_CT_SIZE :]
        return Accept(epoch, ik, ek, ct, confirm)
    raise BlobError(f"unknown e2e blob kind 0x{kind:02x}")
