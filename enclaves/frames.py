"""Sans-IO outer frame codec (DESIGN.md §3).

A frame is ``u32 N || body`` with ``body = u8 version || u8 type || payload``.
:class:`FrameDecoder` enforces the size limit from the length prefix alone, so
an oversize frame is refused before a byte of its body is buffered.
"""

from __future__ import annotations

import enum
import struct

from attrs import frozen

__all__ = [
    "VERSION",
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
DEFAULT_MAX_FRAME = 65536
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
    if body[0] != VERSION:
        raise FrameError(f"unsupported protocol version {body[0]}")
    try:
        frame_type = FrameType(body[1])
    except ValueError:
        raise FrameError(f"unknown frame type 0x{body[1]:02x}") from None
    return Frame(frame_type, bytes(body[2:]))


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frames back.

    After the first :class:`FrameError` the decoder is dead and raises again;
    the connection must be dropped.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 2:
            raise ValueError("max_frame must allow at least a header")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        try:
            while len(buffer) - offset >= 4:
                (size,) = _HEADER.unpack_from(buffer, offset)
                if size > self.max_frame:
                    raise FrameTooLarge(
                        f"frame of {size} bytes exceeds the limit of {self.max_frame}"
                    )
                end = offset + 4 + size
                if len(buffer) < end:
                    break
                frames.append(decode_body(bytes(buffer[offset + 4 : end])))
                offset = end
        except FrameError as error:
            self._failed = error
            self._buffer = bytearray()
            raise
        if offset:
            del buffer[:offset]
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
