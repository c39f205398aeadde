"""Sans-IO sealed session (docs/protocol.rst, "Session frames").

One :class:`Session` per connection and side: it seals outgoing inner messages
with this side's direction keys and opens incoming SEALED payloads with the
other's, each direction numbering its frames from 0.  Queued messages are
coalesced into as few sealed frames as the frame limit allows, so the crypto
cost is per write, not per message.

A session's ``max_frame`` is the largest frame *it sends* (the server's
``--max-frame``; the protocol's :data:`~enclaves.frames.MAX_FRAME` for a
client).  What it accepts is the decoder's business, and is always
:data:`~enclaves.frames.MAX_FRAME`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

from enclaves.crypto import BLOCK, TAG_SIZE, CryptoError, StreamSealer
from enclaves.frames import MAX_FRAME, VERSION, ErrorCode, FrameType
from enclaves.handshake import SessionKeys
from enclaves.inner import (
    InnerError,
    InnerMessage,
    ServerInbound,
    decode_all,
    decode_routed,
    encode,
)

__all__ = [
    "SessionError",
    "Session",
    "max_inner_size",
    "max_blob_size",
    "sealed_aad",
]

T = TypeVar("T")
_U64 = struct.Struct(">Q")
_HEADER = struct.Struct(">IBB")
_SEALED_AAD_PREFIX = bytes((VERSION, FrameType.SEALED))
_SEQ_LIMIT = 1 << 64
# Frame body overhead around the padded plaintext: version, type, seq, IV, tag.
_OVERHEAD = 2 + 8 + BLOCK + TAG_SIZE
# SEND / DELIVER overhead inside the plaintext: length, kind, msg_id, peer id.
_SEND_OVERHEAD = 4 + 1 + 16 + 8


def max_inner_size(max_frame: int) -> int:
    """The most plaintext bytes one SEALED frame body of ``max_frame`` can carry."""
    blocks = (max_frame - _OVERHEAD) // BLOCK
    return max(blocks * BLOCK - 1, 0)  # PKCS#7 always adds at least one byte


def max_blob_size(max_frame: int) -> int:
    """The largest e2e blob whose SEND (and DELIVER) fits one frame."""
    return max(max_inner_size(max_frame) - _SEND_OVERHEAD, 0)


# What the protocol's largest frame carries: no inner message may be larger.
_PROTOCOL_MAX_INNER = max_inner_size(MAX_FRAME)


def sealed_aad(seq: int) -> bytes:
    """``version || type || u64 seq``: what each SEALED frame's tag also covers."""
    return _SEALED_AAD_PREFIX + _U64.pack(seq)


class SessionError(Exception):
    """The session must end; ``code`` is the ERROR to send, the text is safe to log."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Session:
    """Seal and open one connection's SEALED frames; ``side`` is "client" or "server"."""

    __slots__ = ("_max_inner", "_opener", "_recv_seq", "_sealer", "_send_seq", "max_frame")

    def __init__(self, keys: SessionKeys, side: str, max_frame: int = MAX_FRAME) -> None:
        if max_frame > MAX_FRAME or max_inner_size(max_frame) <= 0:
            raise ValueError(f"max_frame must fit a frame and be at most {MAX_FRAME}")
        if side == "client":
            send, recv = keys.c2s, keys.s2c
        elif side == "server":
            send, recv = keys.s2c, keys.c2s
        else:
            raise ValueError("side must be 'client' or 'server'")
        self._sealer = StreamSealer(send)
        self._opener = StreamSealer(recv)
        self._send_seq = 0
        self._recv_seq = 0
        self.max_frame = max_frame
        self._max_inner = max_inner_size(max_frame)

    def __repr__(self) -> str:
        return f"<Session sent={self._send_seq} received={self._recv_seq}>"

    @property
    def max_blob(self) -> int:
        return max_blob_size(self.max_frame)

    def seal_frame(self, plaintext: bytes) -> bytes:
        """One whole SEALED frame (length prefix included) carrying ``plaintext``.

        ``plaintext`` may exceed this session's ``max_frame`` up to the
        protocol's limit: see :meth:`seal`.
        """
        if len(plaintext) > _PROTOCOL_MAX_INNER:
            raise ValueError("plaintext does not fit one frame")
        seq = self._send_seq
        if seq + 1 >= _SEQ_LIMIT:
            raise SessionError(ErrorCode.BAD_SESSION_FRAME, "sequence numbers exhausted")
        self._send_seq = seq + 1
        seq_bytes = _U64.pack(seq)
        sealed = self._sealer.seal(_SEALED_AAD_PREFIX + seq_bytes, plaintext)
        body_size = 2 + 8 + len(sealed)
        return _HEADER.pack(body_size, VERSION, FrameType.SEALED) + seq_bytes + sealed

    def seal(self, messages: Iterable[InnerMessage | bytes]) -> bytes:
        """Coalesce ``messages`` into as few SEALED frames as fit; returns the wire bytes.

        An item of type ``bytes`` is taken as already encoded (``encode``'s
        output, perhaps of several messages): the router's hot path.

        Frames are filled up to ``max_frame`` and never beyond.  One message
        too large for that but within the protocol's
        :data:`~enclaves.frames.MAX_FRAME` (on a server, a stored message
        accepted under an earlier, larger ``--max-frame``) goes alone in a
        frame of its own: every peer accepts that.  A message too large for
        any frame raises ``ValueError`` (callers refuse such blobs up front
        with MESSAGE_TOO_LARGE).
        """
        limit = self._max_inner
        raws = [m if type(m) is bytes else encode(m) for m in messages]  # type: ignore[arg-type]
        if not raws:
            return b""
        whole = b"".join(raws)
        if len(whole) <= limit:  # the usual case: one frame
            return self.seal_frame(whole)
        if max(map(len, raws)) > _PROTOCOL_MAX_INNER:
            # Before any frame is sealed: no sequence number is spent on output
            # the caller then drops.
            raise ValueError("inner message does not fit one frame")
        out: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        for raw in raws:
            if len(raw) > limit:
                if chunk:
                    out.append(self.seal_frame(b"".join(chunk)))
                    chunk, size = [], 0
                out.append(self.seal_frame(raw))
                continue
            if size + len(raw) > limit:
                out.append(self.seal_frame(b"".join(chunk)))
                chunk, size = [], 0
            chunk.append(raw)
            size += len(raw)
        if chunk:
            out.append(self.seal_frame(b"".join(chunk)))
        return b"".join(out)

    def open(self, payload: bytes) -> list[InnerMessage]:
        """Check seq, tag, then decode; any defect raises :class:`SessionError`."""
        return self._open(payload, decode_all)

    def open_routed(self, payload: bytes) -> list[ServerInbound]:
        """:meth:`open` with :func:`~enclaves.inner.decode_routed`: the server's."""
        return self._open(payload, decode_routed)

    def _open(self, payload: bytes, decode: Callable[[bytes], list[T]]) -> list[T]:
        if len(payload) < 8:
            raise SessionError(ErrorCode.BAD_SESSION_FRAME, "sealed frame too short")
        (seq,) = _U64.unpack_from(payload)
        if seq != self._recv_seq:
            raise SessionError(
                ErrorCode.BAD_SESSION_FRAME,
                f"sealed frame out of sequence (got {seq}, expected {self._recv_seq})",
            )
        try:
            plaintext = self._opener.open(_SEALED_AAD_PREFIX + payload[:8], payload[8:])
        except CryptoError:
            raise SessionError(
                ErrorCode.BAD_SESSION_FRAME, "sealed frame failed its check"
            ) from None
        self._recv_seq = seq + 1
        try:
            return decode(plaintext)
        except InnerError as error:
            raise SessionError(error.code, str(error)) from None
