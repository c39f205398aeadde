"""Sans-IO outer frame codec (DESIGN.md §3).

A frame is ``u32 N || body`` with ``body = u8 version || u8 type || payload``.
:class:`FrameDecoder` enforces the size limit from the length prefix alone, so
an oversize frame is refused before a byte of its body is buffered.

:data:`MAX_FRAME` is the protocol's limit on ``N`` in both directions: no
conforming peer sends a larger frame and every peer accepts frames up to it
(docs/protocol.rst, "Frames").  A server's ``--max-frame`` may only lower what
it *sends*; it never lowers what it accepts.
"""

from __future__ import annotations

import enum
import struct

from attrs import frozen

__all__ = [
    "VERSION",
    "MAX_FRAME",
    "DEFAULT_MAX_FRAME",
    "FrameType",
    "ErrorCode",
    "Frame",
    "FrameError",
    "FrameTooLarge",
    "FrameDecoder",
    "encode_frame",
    "decode_body",
    "encode_error",
    "decode_error",
]

VERSION = 1
#: The protocol's frame limit (largest ``N``), the same for every peer.
MAX_FRAME = 65536
#: The default of the server's ``--max-frame`` (the largest frame it sends).
DEFAULT_MAX_FRAME = MAX_FRAME
_HEADER = struct.Struct(">I")
_MAX_ERROR_TEXT = 1024


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    ERROR = 0x03
    SEALED = 0x10


class ErrorCode(enum.IntEnum):
    """Codes carried by outer and inner ERROR messages (docs/protocol.rst)."""

    BAD_FRAME = 1
    FRAME_TOO_LARGE = 2
    AUTH_FAILED = 3
    RATE_LIMITED = 4
    HANDSHAKE_TIMEOUT = 5
    BAD_SESSION_FRAME = 6
    ENROLLMENT_REQUIRED = 7
    TOKEN_EXPIRED = 8
    UNKNOWN_RECIPIENT = 9
    QUOTA_EXCEEDED = 10
    STORAGE_FAILED = 11
    INVITES_DISABLED = 12
    UNKNOWN_KIND = 13
    SERVER_BUSY = 14
    REPLACED = 15
    REVOKED = 16
    MESSAGE_RATE = 17
    SHUTTING_DOWN = 18
    BAD_MESSAGE = 19
    IDLE_TIMEOUT = 20
    MESSAGE_TOO_LARGE = 21


class FrameError(Exception):
    """A frame that cannot be accepted; ``code`` says which ERROR to send."""

    code: ErrorCode = ErrorCode.BAD_FRAME

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class FrameTooLarge(FrameError):
    code = ErrorCode.FRAME_TOO_LARGE


@frozen
class Frame:
    """A decoded frame: its type and the bytes after the type byte."""

    type: FrameType
    payload: bytes

    @property
    def body(self) -> bytes:
        """The frame body exactly as on the wire (version byte onwards)."""
        return bytes((VERSION, self.type)) + self.payload


def encode_frame(frame_type: FrameType, payload: bytes) -> bytes:
    """Length prefix, version and type, then ``payload``."""
    return _HEADER.pack(len(payload) + 2) + bytes((VERSION, frame_type)) + payload


def decode_body(body: bytes) -> Frame:
    """Parse one frame body; raises :class:`FrameError` for anything malformed."""
    if len(body) < 2:
        raise FrameError("frame shorter than its header")
    return _frame(body[0], body[1], bytes(body[2:]))


_TYPES = {int(frame_type): frame_type for frame_type in FrameType}
_new_frame = object.__new__
_set_type = Frame.__dict__["type"].__set__  # the slot descriptors of the frozen class
_set_payload = Frame.__dict__["payload"].__set__


def _frame(version: int, type_byte: int, payload: bytes) -> Frame:
    """A :class:`Frame` from a checked header, built without attrs' frozen __init__."""
    if version != VERSION:
        raise FrameError(f"unsupported protocol version {version}")
    frame_type = _TYPES.get(type_byte)
    if frame_type is None:
        raise FrameError(f"unknown frame type 0x{type_byte:02x}")
    frame: Frame = _new_frame(Frame)
    _set_type(frame, frame_type)
    _set_payload(frame, payload)
    return frame


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frames back.

    After the first :class:`FrameError` the decoder is dead and raises again;
    the connection must be dropped.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if max_frame < 2:
            raise ValueError("max_frame must allow at least a header")
        self.max_frame = max_frame
        # The start of a frame whose rest has not come yet (one bytearray: a
        # frame that trickles in a byte at a time costs about its size, and
        # appending is amortised), and the size at which that frame (or at
        # least its length prefix) is complete.
        self._pending = bytearray()
        self._need = 4
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        pending = self._pending
        size = len(data)
        if not pending and size >= 6 and _HEADER.unpack_from(data)[0] == size - 4 <= self.max_frame:
            # Exactly one whole frame and nothing held: the usual read.
            try:
                return [_frame(data[4], data[5], bytes(data[6:]))]
            except FrameError as error:
                self._failed = error
                raise
        if pending:
            pending += data
            if len(pending) < self._need:
                return []
            data = bytes(pending)
        else:
            data = bytes(data)
        frames: list[Frame] = []
        append = frames.append
        unpack = _HEADER.unpack_from
        limit = self.max_frame
        available = len(data)
        offset = 0
        need = 4
        try:
            while available - offset >= 4:
                (size,) = unpack(data, offset)
                if size > limit:
                    raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {limit}")
                end = offset + 4 + size
                if available < end:
                    need = 4 + size
                    break
                if size < 2:
                    raise FrameError("frame shorter than its header")
                append(_frame(data[offset + 4], data[offset + 5], data[offset + 6 : end]))
                offset = end
        except FrameError as error:
            self._failed = error
            self._pending = bytearray()
            raise
        self._pending = bytearray(data[offset:]) if offset < available else bytearray()
        self._need = need
        return frames


def encode_error(code: ErrorCode | int, text: str) -> bytes:
    """ERROR payload: ``u16 code || UTF-8 text`` (text cut to 1024 bytes)."""
    raw = text.encode("utf-8")[:_MAX_ERROR_TEXT]
    return struct.pack(">H", int(code)) + raw.decode("utf-8", "ignore").encode("utf-8")


def decode_error(payload: bytes) -> tuple[int, str]:
    """Parse an ERROR payload into (code, text)."""
    if len(payload) < 2:
        raise FrameError("ERROR shorter than its code")
    (code,) = struct.unpack_from(">H", payload)
    try:
        text = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("ERROR text is not UTF-8") from None
    return code, text
