"""Sans-IO end-to-end MESSAGE layer (DESIGN.md §5, docs/protocol.rst).

``MESSAGE = 0x01 || u32 epoch || seal(pair, aad, u8 content_type || u64 counter
|| u64 unix_ms || body)`` with ``aad = "enclaves/v1/e2e" || 0x01 || u32 epoch ||
sender u64 || recipient u64``.  Binding sender and recipient into the aad means
a message can not be reflected back to its author.  :class:`ReplayWindow` is
the RFC 4303 style 64-wide window over the per-sender counter.
"""

from __future__ import annotations

import enum
import struct

from attrs import field, frozen

from enclaves.client.blob import BlobKind, MessageBlob
from enclaves.crypto import CryptoError, Sealer

__all__ = [
    "E2E_LABEL",
    "WINDOW",
    "ContentType",
    "Plaintext",
    "ReplayError",
    "ReplayWindow",
    "message_aad",
    "seal_message",
    "open_message",
]

E2E_LABEL = b"enclaves/v1/e2e"
WINDOW = 64
_HEAD = struct.Struct(">BQQ")  # content_type, counter, unix_ms
_AAD_TAIL = struct.Struct(">BIQQ")  # kind, epoch, sender, recipient
_MASK = (1 << WINDOW) - 1


class ContentType(enum.IntEnum):
    TEXT = 0x01  # body is UTF-8 text
    # Empty body; sent by a KEX initiator under the new epoch right after the
    # ACCEPT's confirm checks: proves to the responder that the initiator holds
    # the new keys, so it may start sending with them.  Never shown to the user.
    KEY_CONFIRM = 0x02


@frozen
class Plaintext:
    """An opened MESSAGE."""

    content_type: int
    counter: int
    unix_ms: int
    body: bytes = field(repr=False)


class ReplayError(Exception):
    """A counter already seen, or older than the window."""


def message_aad(epoch: int, sender: int, recipient: int) -> bytes:
    return E2E_LABEL + _AAD_TAIL.pack(BlobKind.MESSAGE, epoch, sender, recipient)


def seal_message(
    sealer: Sealer,
    epoch: int,
    sender: int,
    recipient: int,
    plain: Plaintext,
) -> bytes:
    """The whole MESSAGE blob, sealed under the pair keys of ``epoch``."""
    inner = _HEAD.pack(plain.content_type, plain.counter, plain.unix_ms) + plain.body
    sealed = sealer.seal(message_aad(epoch, sender, recipient), inner)
    return MessageBlob(epoch, sealed).to_bytes()


def open_message(sealer: Sealer, blob: MessageBlob, sender: int, recipient: int) -> Plaintext:
    """Open a MESSAGE that ``sender`` (per the server) sent to ``recipient`` (us).

    Any failure, including a message sealed for another direction, is
    :class:`~enclaves.crypto.CryptoError`.
    """
    inner = sealer.open(message_aad(blob.epoch, sender, recipient), blob.sealed)
    if len(inner) < _HEAD.size:
        raise CryptoError()
    content_type, counter, unix_ms = _HEAD.unpack_from(inner)
    if counter == 0:
        raise CryptoError()
    return Plaintext(content_type, counter, unix_ms, inner[_HEAD.size :])


@frozen
class ReplayWindow:
    """Highest counter seen and a bitmap of the 64 counters up to it (bit 0 = highest).

    Counters start at 1; ``highest == 0`` means nothing seen yet.  Call
    :meth:`accept` only after the MESSAGE authenticated.
    """

    highest: int = 0
    bitmap: int = 0

    def accept(self, counter: int) -> ReplayWindow:
        """The window with ``counter`` recorded, or :class:`ReplayError`."""
        if counter <= 0:
            raise ReplayError("counter must be positive")
        if counter > self.highest:
            shift = counter - self.highest
            bitmap = ((self.bitmap << shift) | 1) & _MASK if shift < WINDOW else 1
            return ReplayWindow(counter, bitmap)
        offset = self.highest - counter
        if offset >= WINDOW:
            raise ReplayError("counter older than the window")
        if self.bitmap >> offset & 1:
            raise ReplayError("counter already seen")
        return ReplayWindow(self.highest, self.bitmap | 1 << offset)
