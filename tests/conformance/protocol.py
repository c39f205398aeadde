"""A second, independent implementation of docs/protocol.rst (sans-IO).

Primitives, frames, the HELLO/WELCOME handshake, session keys, sealed
session frames, inner messages and the enrollment token.  Written from the
docs only; see the package docstring for the rule.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import cmac, hashes, padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
DEFAULT_MAX_FRAME = 65536  # "Frames": the protocol's frame limit, the same both ways
MAX_ERROR_TEXT = 1024


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


class Keys(NamedTuple):
    """A key pair: ``enc`` (AES-256-CBC) and ``auth`` (AES-256-CMAC), 32 bytes each."""

    enc: bytes
    auth: bytes


# -- primitives ("Identifiers and primitives") -----------------------------------


class OpenError(Exception):
    """The one error of ``open``, whatever check failed."""


def aes_cmac(key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def pkcs7_pad(data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    return padder.update(data) + padder.finalize()


def pkcs7_unpad(data: bytes) -> bytes:
    """Strict PKCS#7: 1 to 16 bytes, all equal to their count."""
    if not data or len(data) % 16:
        raise OpenError()
    count = data[-1]
    if not 1 <= count <= 16 or data[-count:] != bytes([count]) * count:
        raise OpenError()
    return data[:-count]


def _seal_tag(keys: Keys, aad: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    return aes_cmac(keys.auth, u16(len(aad)) + aad + iv + ciphertext)


def seal(keys: Keys, aad: bytes, plaintext: bytes, iv: bytes | None = None) -> bytes:
    """``IV || C || T``; the IV is random unless given (a receiver never checks it)."""
    iv = os.urandom(16) if iv is None else iv
    ciphertext = cbc_encrypt(keys.enc, iv, pkcs7_pad(plaintext))
    return iv + ciphertext + _seal_tag(keys, aad, iv, ciphertext)


def open_sealed(keys: Keys, aad: bytes, blob: bytes) -> bytes:
    """Length, constant-time tag, decryption, strict unpadding; any failure is OpenError."""
    if len(blob) < 48 or (len(blob) - 16) % 16:
        raise OpenError()
    iv, ciphertext, tag = blob[:16], blob[16:-16], blob[-16:]
    if not hmac.compare_digest(_seal_tag(keys, aad, iv, ciphertext), tag):
        raise OpenError()
    return pkcs7_unpad(cbc_decrypt(keys.enc, iv, ciphertext))


def x25519_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def x25519(private: X25519PrivateKey, public: bytes) -> bytes:
    """The shared secret; an all-zero one is refused (ValueError)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))  # refuses zero too
    if shared == bytes(32):
        raise ValueError("all-zero X25519 shared secret")
    return shared


# -- frames ("Frames", "Error codes") ------------------------------------------------


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    ERROR = 0x03
    SEALED = 0x10


class ErrorCode(enum.IntEnum):
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
    """A frame that cannot be accepted; ``code`` is BAD_FRAME or FRAME_TOO_LARGE."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


class Frame(NamedTuple):
    type: FrameType
    payload: bytes
    body: bytes  # version byte onwards, as on the wire


def encode_frame(frame_type: FrameType, payload: bytes) -> bytes:
    body = bytes([VERSION, frame_type]) + payload
    return u32(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frames."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            (size,) = struct.unpack(">I", self.buffer[:4])
            if size > self.max_frame:  # from the length prefix alone
                raise FrameError(ErrorCode.FRAME_TOO_LARGE, f"frame too large: {size}")
            if len(self.buffer) < 4 + size:
                break
            body = bytes(self.buffer[4 : 4 + size])
            del self.buffer[: 4 + size]
            frames.append(_decode_body(body))
        return frames


_FRAME_TYPES = frozenset(FrameType)


def _decode_body(body: bytes) -> Frame:
    # "An unknown version or type is BAD_FRAME."
    if len(body) < 2 or body[0] != VERSION or body[1] not in _FRAME_TYPES:
        raise FrameError(ErrorCode.BAD_FRAME, "bad frame body")
    return Frame(FrameType(body[1]), body[2:], body)


def cut_utf8(text: str, limit: int = MAX_ERROR_TEXT) -> bytes:
    """``text`` in UTF-8, cut to ``limit`` bytes on a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_error_frame(code: int, text: str) -> bytes:
    return encode_frame(FrameType.ERROR, u16(code) + cut_utf8(text))


def decode_error_payload(payload: bytes) -> tuple[int, str]:
    """(code, text) of an ERROR frame; its text is for display only."""
    (code,) = struct.unpack(">H", payload[:2])
    return code, payload[2:].decode("utf-8", "replace")


# -- handshake ("Handshake") -------------------------------------------------------

HELLO_LABEL = b"enclaves/v1/hello"
WELCOME_LABEL = b"enclaves/v1/welcome"
SESSION_INFO = b"enclaves/v1/session"


class HandshakeFailed(Exception):
    """A HELLO or WELCOME of the wrong size or with a bad tag."""


class Hello(NamedTuple):
    user_id: int
    nonce: bytes
    ec_public: bytes
    tag: bytes


class SessionKeys(NamedTuple):
    c2s: Keys
    s2c: Keys


def hello_tag(keys: Keys, user_id: int, nonce: bytes, ec_public: bytes) -> bytes:
    # A plain CMAC, the label first, without seal's u16 length prefix.
    return aes_cmac(keys.auth, HELLO_LABEL + u64(user_id) + nonce + ec_public)


def make_hello(
    user_id: int,
    keys: Keys,
    nonce: bytes | None = None,
    ephemeral: X25519PrivateKey | None = None,
) -> tuple[bytes, X25519PrivateKey]:
    """The whole HELLO frame and the ephemeral private key ``ec``."""
    nonce = os.urandom(32) if nonce is None else nonce
    ephemeral = X25519PrivateKey.generate() if ephemeral is None else ephemeral
    ec_public = x25519_public(ephemeral)
    payload = u64(user_id) + nonce + ec_public + hello_tag(keys, user_id, nonce, ec_public)
    return encode_frame(FrameType.HELLO, payload), ephemeral


def parse_hello(payload: bytes) -> Hello:
    if len(payload) != 88:
        raise HandshakeFailed("HELLO is not 88 bytes")
    (user_id,) = struct.unpack(">Q", payload[:8])
    return Hello(user_id, payload[8:40], payload[40:72], payload[72:88])


def hello_tag_ok(keys: Keys, hello: Hello) -> bool:
    expected = hello_tag(keys, hello.user_id, hello.nonce, hello.ec_public)
    return hmac.compare_digest(expected, hello.tag)


def transcript_hash(hello_body: bytes, ns: bytes, es_public: bytes) -> bytes:
    """``H = SHA-256(hello_body || ns || es_pub)``."""
    return hashlib.sha256(hello_body + ns + es_public).digest()


def make_welcome(
    hello_body: bytes,
    keys: Keys,
    nonce: bytes | None = None,
    ephemeral: X25519PrivateKey | None = None,
) -> tuple[bytes, bytes, X25519PrivateKey]:
    """The whole WELCOME frame, ``H`` and the ephemeral private key ``es``."""
    nonce = os.urandom(32) if nonce is None else nonce
    ephemeral = X25519PrivateKey.generate() if ephemeral is None else ephemeral
    es_public = x25519_public(ephemeral)
    h = transcript_hash(hello_body, nonce, es_public)
    tag = aes_cmac(keys.auth, WELCOME_LABEL + h)
    return encode_frame(FrameType.WELCOME, nonce + es_public + tag), h, ephemeral


def check_welcome(hello_body: bytes, keys: Keys, payload: bytes) -> tuple[bytes, bytes]:
    """``(H, es_pub)`` of a WELCOME whose tag verifies (in constant time)."""
    if len(payload) != 80:
        raise HandshakeFailed("WELCOME is not 80 bytes")
    ns, es_public, tag = payload[:32], payload[32:64], payload[64:]
    h = transcript_hash(hello_body, ns, es_public)
    if not hmac.compare_digest(aes_cmac(keys.auth, WELCOME_LABEL + h), tag):
        raise HandshakeFailed("WELCOME tag does not verify")
    return h, es_public


def session_keys(shared: bytes, keys: Keys, h: bytes) -> SessionKeys:
    """HKDF-SHA256(X25519 || K_u.enc || K_u.auth, salt H) = c2s.enc, c2s.auth, s2c.enc, s2c.auth."""
    okm = HKDF(hashes.SHA256(), 128, h, SESSION_INFO).derive(shared + keys.enc + keys.auth)
    return SessionKeys(Keys(okm[0:32], okm[32:64]), Keys(okm[64:96], okm[96:128]))


# -- sealed frames ("Session frames") ------------------------------------------------


def sealed_aad(seq: int) -> bytes:
    return bytes([VERSION, FrameType.SEALED]) + u64(seq)


class Direction:
    """One direction's SEALED frames, numbered from 0: a side seals or opens with it."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.seq = 0

    def seal_frame(self, plaintext: bytes, iv: bytes | None = None) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        sealed = seal(self.keys, sealed_aad(seq), plaintext, iv)
        return encode_frame(FrameType.SEALED, u64(seq) + sealed)

    def open_payload(self, payload: bytes) -> bytes:
        """The plaintext of the next frame; any other ``seq`` is OpenError."""
        if len(payload) < 8:
            raise OpenError()
        (seq,) = struct.unpack(">Q", payload[:8])
        if seq != self.seq:
            raise OpenError()
        plaintext = open_sealed(self.keys, sealed_aad(seq), payload[8:])
        self.seq += 1
        return plaintext


# -- inner messages ("Inner messages") -----------------------------------------------


class Kind(enum.IntEnum):
    SEND = 0x01
    DELIVER = 0x02
    ACCEPTED = 0x03
    RECEIVED = 0x04
    DELIVERED = 0x05
    ROTATE = 0x06
    ROTATED = 0x07
    DIRECTORY = 0x08
    JOINED = 0x09
    REMOVED = 0x0A
    INVITE = 0x0B
    INVITE_TOKEN = 0x0C
    ERROR = 0x0D
    PING = 0x0E
    PONG = 0x0F


@dataclass(frozen=True)
class Inner:
    """One inner message: its kind and its fields, named as in the spec's table."""

    kind: Kind
    fields: dict[str, Any] = field(default_factory=dict)


class InnerError(Exception):
    """A plaintext that is not inner messages; ``code`` is BAD_MESSAGE or UNKNOWN_KIND."""

    def __init__(self, text: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(text)
        self.code = code


def _encode_fields(message: Inner) -> bytes:
    kind, f = message.kind, message.fields
    if kind is Kind.SEND:
        return f["msg_id"] + u64(f["recipient"]) + f["blob"]
    if kind is Kind.DELIVER:
        return f["msg_id"] + u64(f["sender"]) + f["blob"]
    if kind in (Kind.ACCEPTED, Kind.RECEIVED, Kind.DELIVERED):
        return f["msg_id"]
    if kind is Kind.ROTATE:
        return f["enc"] + f["auth"]
    if kind in (Kind.ROTATED, Kind.INVITE):
        return b""
    if kind is Kind.DIRECTORY:
        ids = f["user_ids"]
        return bytes([int(f["more"])]) + u32(len(ids)) + b"".join(u64(i) for i in ids)
    if kind in (Kind.JOINED, Kind.REMOVED):
        return u64(f["user_id"])
    if kind is Kind.INVITE_TOKEN:
        return u64(f["user_id"]) + u64(f["expires_ms"]) + f["token"].encode("utf-8")
    if kind is Kind.ERROR:
        return u16(f["code"]) + f["msg_id"] + cut_utf8(f["text"])
    return u64(f["nonce"])  # PING, PONG


def encode_inner(message: Inner) -> bytes:
    """``u32 length || u8 kind || fields``, the length counting kind and fields."""
    fields = _encode_fields(message)
    return u32(1 + len(fields)) + bytes([message.kind]) + fields


def encode_all(messages: list[Inner]) -> bytes:
    return b"".join(encode_inner(message) for message in messages)


def _exact(kind: Kind, fields: bytes, size: int) -> None:
    if len(fields) != size:
        raise InnerError(f"{kind.name} carries {len(fields)} bytes, not {size}")


def _at_least(kind: Kind, fields: bytes, size: int) -> None:
    if len(fields) < size:
        raise InnerError(f"{kind.name} carries {len(fields)} bytes, fewer than {size}")


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InnerError("text is not UTF-8") from None


def _routed(kind: Kind, fields: bytes) -> dict[str, Any]:
    _at_least(kind, fields, 24)  # the blob may be empty
    peer = "recipient" if kind is Kind.SEND else "sender"
    return {"msg_id": fields[:16], peer: struct.unpack(">Q", fields[16:24])[0], "blob": fields[24:]}


def _directory(fields: bytes) -> dict[str, Any]:
    _at_least(Kind.DIRECTORY, fields, 5)
    flags, count = struct.unpack(">BI", fields[:5])
    _exact(Kind.DIRECTORY, fields, 5 + 8 * count)
    if flags & ~1:  # "other flag bits are zero (a receiver rejects others)"
        raise InnerError("DIRECTORY has unknown flags")
    return {"user_ids": struct.unpack(f">{count}Q", fields[5:]), "more": bool(flags & 1)}


def _rotate(fields: bytes) -> dict[str, Any]:
    _exact(Kind.ROTATE, fields, 64)
    if fields[:32] == fields[32:]:
        raise InnerError("ROTATE keys must differ")
    return {"enc": fields[:32], "auth": fields[32:]}


def _invite_token(fields: bytes) -> dict[str, Any]:
    _at_least(Kind.INVITE_TOKEN, fields, 16)
    user_id, expires_ms = struct.unpack(">QQ", fields[:16])
    return {"user_id": user_id, "expires_ms": expires_ms, "token": _utf8(fields[16:])}


def _error(fields: bytes) -> dict[str, Any]:
    _at_least(Kind.ERROR, fields, 18)  # a longer text than 1024 bytes is still read
    (code,) = struct.unpack(">H", fields[:2])
    return {"code": code, "msg_id": fields[2:18], "text": _utf8(fields[18:])}


def _decode_fields(kind: Kind, fields: bytes) -> dict[str, Any]:
    """The fields of one message; "Sizes are exact"."""
    if kind in (Kind.SEND, Kind.DELIVER):
        return _routed(kind, fields)
    if kind in (Kind.ACCEPTED, Kind.RECEIVED, Kind.DELIVERED):
        _exact(kind, fields, 16)
        return {"msg_id": fields}
    if kind is Kind.ROTATE:
        return _rotate(fields)
    if kind in (Kind.ROTATED, Kind.INVITE):
        _exact(kind, fields, 0)
        return {}
    if kind is Kind.DIRECTORY:
        return _directory(fields)
    if kind is Kind.INVITE_TOKEN:
        return _invite_token(fields)
    if kind is Kind.ERROR:
        return _error(fields)
    _exact(kind, fields, 8)
    (value,) = struct.unpack(">Q", fields)
    return {"user_id" if kind in (Kind.JOINED, Kind.REMOVED) else "nonce": value}


_KINDS = frozenset(Kind)


def decode_inner(plaintext: bytes) -> list[Inner]:
    """Every inner message of a plaintext; an empty one, a length of 0, a header cut
    short or bytes after the last message are BAD_MESSAGE, an unknown kind UNKNOWN_KIND."""
    if not plaintext:
        raise InnerError("empty plaintext")
    messages = []
    offset = 0
    while offset < len(plaintext):
        if len(plaintext) - offset < 5:
            raise InnerError("inner header cut short")
        (size,) = struct.unpack(">I", plaintext[offset : offset + 4])
        end = offset + 4 + size
        if size < 1 or end > len(plaintext):
            raise InnerError("inner length does not fit")
        kind_byte, fields = plaintext[offset + 4], plaintext[offset + 5 : end]
        if kind_byte not in _KINDS:
            raise InnerError(f"unknown kind 0x{kind_byte:02x}", ErrorCode.UNKNOWN_KIND)
        kind = Kind(kind_byte)
        messages.append(Inner(kind, _decode_fields(kind, fields)))
        offset = end
    return messages


# -- enrollment token ("Enrollment token") -------------------------------------------

TOKEN_PREFIX = "enclaves1:"


class Token(NamedTuple):
    user_id: int
    keys: Keys
    address: str | None  # host:port or tls:host:port


def parse_token(text: str) -> Token:
    """``enclaves1:<base64url, unpadded, of u64 id || enc || auth>[@address]``."""
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise ValueError("not an enrollment token")
    encoded, _, address = text[len(TOKEN_PREFIX) :].partition("@")
    raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    if len(raw) != 72:
        raise ValueError("an enrollment token holds 72 bytes")
    (user_id,) = struct.unpack(">Q", raw[:8])
    return Token(user_id, Keys(raw[8:40], raw[40:72]), address or None)
