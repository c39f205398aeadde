"""Sans-IO encoders and decoders of the server's files (DESIGN.md §7, docs/storage.rst).

Bytes in, bytes out: no files, no reactor.  Every decoder failure raises
:class:`FormatError` with one fixed message, whatever check failed.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping

from attrs import field, frozen
from cryptography.hazmat.primitives import padding

from enclaves.crypto import BLOCK, TAG_SIZE, CryptoError, KeyPair, Sealer

__all__ = [
    "FormatError",
    "USER_FILE_SIZE",
    "MSG_HEADER_SIZE",
    "MSG_MIN_SIZE",
    "USER_SUFFIX",
    "MSG_SUFFIX",
    "ENROLLMENT_AAD",
    "MessageRecord",
    "encode_user",
    "decode_user",
    "encode_msg",
    "decode_msg",
    "msg_file_size",
    "encode_enrollment",
    "decode_enrollment",
    "user_file_name",
    "msg_file_name",
    "parse_user_name",
    "parse_msg_name",
    "NOTICE_SUFFIX",
    "MAX_NOTICE_DATA",
    "NoticeRecord",
    "encode_notice",
    "decode_notice",
    "notice_file_name",
    "parse_notice_name",
]

USER_FILE_SIZE = 80
#: recipient u64 || sender u64 || msg_id 16, before the e2e blob.
MSG_HEADER_SIZE = 8 + 8 + 16
#: IV, the smallest padded plaintext (header + padding = 48 bytes), tag.
MSG_MIN_SIZE = BLOCK + 48 + TAG_SIZE
USER_SUFFIX = ".user"
MSG_SUFFIX = ".msg"
NOTICE_SUFFIX = ".notice"
#: Most bytes of one notice's data (an encoded inner message).
MAX_NOTICE_DATA = 4096
U64_MAX = (1 << 64) - 1

_USER_LABEL = b"enclaves/v1/user"
_MSG_LABEL = b"enclaves/v1/msg"
ENROLLMENT_AAD = b"enclaves/v1/enrollment"
_NOTICE_LABEL = b"enclaves/v1/notice"
_NOTICE_HEADER = struct.Struct(">QQ")  # user id, created (unix ms)
_ENROLLMENT_ENTRY = struct.Struct(">QQ")
_U64 = struct.Struct(">Q")
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,19})")


class FormatError(Exception):
    """A stored file failed its check.  The message never varies."""

    def __init__(self) -> None:
        super().__init__("stored file failed its integrity check")


@frozen
class NoticeRecord:
    """The plaintext of a ``.notice`` file: what to tell ``user_id`` at its next login."""

    user_id: int
    created_ms: int
    data: bytes = field(repr=lambda b: f"<{len(b)} bytes>")


@frozen
class MessageRecord:
    """The plaintext of a ``.msg`` file."""

    recipient: int
    sender: int
    msg_id: bytes
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")


def _u64(value: int) -> bytes:
    return _U64.pack(value)


# -- <id>.user -------------------------------------------------------------------


def encode_user(sealer: Sealer, user_id: int, keys: KeyPair) -> bytes:
    """``IV || C``: IV = CMAC(S.auth, label || u64 id || enc || auth), C = AES-CBC, no pad."""
    if not 0 < user_id <= U64_MAX:
        raise ValueError("a user id is a non-zero u64")
    plain = keys.enc + keys.auth
    iv = sealer.mac(_USER_LABEL, _u64(user_id), plain)
    return iv + sealer.encrypt_raw(iv, plain)


def decode_user(sealer: Sealer, user_id: int, data: bytes) -> KeyPair:
    """Decrypt, recompute the synthetic IV with ``user_id`` (from the file name), compare."""
    if len(data) != USER_FILE_SIZE or not 0 < user_id <= U64_MAX:
        raise FormatError()
    data = bytes(data)
    iv = data[:BLOCK]
    plain = sealer.decrypt_raw(iv, data[BLOCK:])
    try:
        sealer.verify(iv, _USER_LABEL, _u64(user_id), plain)
        return KeyPair(plain[:32], plain[32:])
    except (CryptoError, ValueError):
        raise FormatError() from None


# -- <n>.msg ---------------------------------------------------------------------


def msg_file_size(blob_size: int) -> int:
    """The size of the ``.msg`` file holding an e2e blob of ``blob_size`` bytes."""
    plain = MSG_HEADER_SIZE + blob_size
    return BLOCK + (plain // BLOCK + 1) * BLOCK + TAG_SIZE


def encode_msg(
    sealer: Sealer,
    file_id: int,
    recipient: int,
    sender: int,
    msg_id: bytes,
    blob: bytes,
    iv: bytes | None = None,
) -> bytes:
    """``IV || C || T`` with T = CMAC(S.auth, label || u64 n || IV || C)."""
    if not 0 <= file_id <= U64_MAX or not 0 < recipient <= U64_MAX or not 0 <= sender <= U64_MAX:
        raise ValueError("file id, recipient and sender are u64 (recipient non-zero)")
    if len(msg_id) != 16:
        raise ValueError("a msg_id is 16 bytes")
    if iv is None:
        iv = os.urandom(BLOCK)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(_u64(recipient) + _u64(sender) + bytes(msg_id) + bytes(blob))
    padded += padder.finalize()
    body = sealer.encrypt_raw(iv, padded)
    return iv + body + sealer.mac(_MSG_LABEL, _u64(file_id), iv, body)


def decode_msg(sealer: Sealer, file_id: int, data: bytes) -> MessageRecord:
    """Length check, constant-time tag check (n from the file name), decrypt, strict unpad."""
    size = len(data)
    if size < MSG_MIN_SIZE or (size - BLOCK - TAG_SIZE) % BLOCK or not 0 <= file_id <= U64_MAX:
        raise FormatError()
    data = bytes(data)
    iv = data[:BLOCK]
    body = data[BLOCK:-TAG_SIZE]
    try:
        sealer.verify(data[-TAG_SIZE:], _MSG_LABEL, _u64(file_id), iv, body)
    except CryptoError:
        raise FormatError() from None
    padded = sealer.decrypt_raw(iv, body)
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise FormatError() from None
    if len(plain) < MSG_HEADER_SIZE:
        raise FormatError()
    recipient, sender = struct.unpack_from(">QQ", plain)
    if recipient == 0:
        raise FormatError()
    return MessageRecord(recipient, sender, plain[16:32], plain[32:])


# -- notices/<n>.notice ------------------------------------------------------------


def _notice_aad(file_id: int) -> bytes:
    return _NOTICE_LABEL + _u64(file_id)


def encode_notice(
    sealer: Sealer, file_id: int, user_id: int, created_ms: int, data: bytes
) -> bytes:
    """``seal(S, "enclaves/v1/notice" || u64 n, u64 user || u64 created_ms || data)``."""
    if not 0 <= file_id <= U64_MAX or not 0 < user_id <= U64_MAX:
        raise ValueError("file id and user id are u64 (user id non-zero)")
    if not 0 <= created_ms <= U64_MAX:
        raise ValueError("a creation time is a u64 of unix milliseconds")
    if not 0 < len(data) <= MAX_NOTICE_DATA:
        raise ValueError(f"notice data is 1 to {MAX_NOTICE_DATA} bytes")
    return sealer.seal(_notice_aad(file_id), _NOTICE_HEADER.pack(user_id, created_ms) + bytes(data))


def decode_notice(sealer: Sealer, file_id: int, data: bytes) -> NoticeRecord:
    """Open with ``n`` from the file name (tag checked before decryption); any defect
    is FormatError."""
    if not 0 <= file_id <= U64_MAX:
        raise FormatError()
    try:
        plain = sealer.open(_notice_aad(file_id), bytes(data))
    except CryptoError:
        raise FormatError() from None
    size = len(plain) - _NOTICE_HEADER.size
    if not 0 < size <= MAX_NOTICE_DATA:
        raise FormatError()
    user_id, created_ms = _NOTICE_HEADER.unpack_from(plain)
    if user_id == 0:
        raise FormatError()
    return NoticeRecord(user_id, created_ms, plain[_NOTICE_HEADER.size :])


# -- enrollment.state --------------------------------------------------------------


def encode_enrollment(sealer: Sealer, table: Mapping[int, int]) -> bytes:
    """``seal(S, "enclaves/v1/enrollment", u32 count || (u64 id || u64 expiry_ms)*)``.

    Entries are sorted by user id, so equal tables give equal plaintexts.
    """
    parts = [struct.pack(">I", len(table))]
    for user_id in sorted(table):
        expires = table[user_id]
        if not 0 < user_id <= U64_MAX or not 0 <= expires <= U64_MAX:
            raise ValueError("enrollment entries are u64 (user id non-zero)")
        parts.append(_ENROLLMENT_ENTRY.pack(user_id, expires))
    return sealer.seal(ENROLLMENT_AAD, b"".join(parts))


def decode_enrollment(sealer: Sealer, data: bytes) -> dict[int, int]:
    """The table user id -> token expiry (unix ms); any defect is FormatError."""
    try:
        plain = sealer.open(ENROLLMENT_AAD, data)
    except CryptoError:
        raise FormatError() from None
    if len(plain) < 4:
        raise FormatError()
    (count,) = struct.unpack_from(">I", plain)
    if len(plain) != 4 + count * _ENROLLMENT_ENTRY.size:
        raise FormatError()
    table: dict[int, int] = {}
    last = 0
    for user_id, expires in _ENROLLMENT_ENTRY.iter_unpack(plain[4:]):
        if user_id <= last:  # zero, unsorted or repeated
            raise FormatError()
        table[user_id] = expires
        last = user_id
    return table


# -- file names ------------------------------------------------------------------


def user_file_name(user_id: int) -> str:
    return f"{user_id}{USER_SUFFIX}"


def msg_file_name(file_id: int) -> str:
    return f"{file_id}{MSG_SUFFIX}"


def _parse_decimal(name: str, suffix: str) -> int | None:
    if not name.endswith(suffix):
        return None
    digits = name[: -len(suffix)]
    if not _DECIMAL.fullmatch(digits):
        return None
    value = int(digits)
    return value if value <= U64_MAX else None


def notice_file_name(file_id: int) -> str:
    return f"{file_id}{NOTICE_SUFFIX}"


def parse_notice_name(name: str) -> int | None:
    """The file id of a canonical ``<n>.notice`` name, else None."""
    return _parse_decimal(name, NOTICE_SUFFIX)


def parse_user_name(name: str) -> int | None:
    """The user id of a canonical ``<id>.user`` name, else None."""
    value = _parse_decimal(name, USER_SUFFIX)
    return value if value else None


def parse_msg_name(name: str) -> int | None:
    """The file id of a canonical ``<n>.msg`` name, else None."""
    return _parse_decimal(name, MSG_SUFFIX)
