"""A second, independent reader and writer of docs/storage.rst's data directory.

The reader authenticates every file with the server key ``S`` and reports what
the directory holds; the writer makes files the real server must load.
Written from the docs only; see the package docstring for the rule.
"""

from __future__ import annotations

import hmac
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from tests.conformance.protocol import (
    Keys,
    OpenError,
    aes_cmac,
    cbc_decrypt,
    cbc_encrypt,
    open_sealed,
    pkcs7_pad,
    pkcs7_unpad,
    seal,
    u32,
    u64,
)

CHECK_LABEL = b"enclaves/v1/check"
CHECK_TEXT = b"enclaves data directory v1"
USER_LABEL = b"enclaves/v1/user"
MSG_LABEL = b"enclaves/v1/msg"
NOTICE_LABEL = b"enclaves/v1/notice"
ENROLLMENT_LABEL = b"enclaves/v1/enrollment"
MAX_NOTICE_DATA = 4096
SEQ_SHIFT = 16  # n = (sequence << 16) | 16 random bits
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # "in decimal ... no leading zeros"


class BadFile(Exception):
    """A file that fails its check."""


class StoredMessage(NamedTuple):
    recipient: int
    sender: int
    msg_id: bytes
    blob: bytes


class Notice(NamedTuple):
    user_id: int
    created_ms: int
    data: bytes  # an encoded inner message, not decoded on loading


def load_server_key(path: Path) -> Keys:
    raw = path.read_bytes()
    if len(raw) != 64:
        raise BadFile(f"a server key is 64 bytes, not {len(raw)}")
    return Keys(raw[:32], raw[32:])


def _open(server_key: Keys, aad: bytes, data: bytes) -> bytes:
    try:
        return open_sealed(server_key, aad, data)
    except OpenError:
        raise BadFile("does not open") from None


# -- reading ---------------------------------------------------------------------------


def read_check(server_key: Keys, data: bytes) -> None:
    if len(data) != 64 or _open(server_key, CHECK_LABEL, data) != CHECK_TEXT:
        raise BadFile("server.check does not belong to this key")


def _user_iv(server_key: Keys, user_id: int, user_keys: bytes) -> bytes:
    return aes_cmac(server_key.auth, USER_LABEL + u64(user_id) + user_keys)


def _msg_tag(server_key: Keys, file_id: int, iv: bytes, ciphertext: bytes) -> bytes:
    return aes_cmac(server_key.auth, MSG_LABEL + u64(file_id) + iv + ciphertext)


def read_user(server_key: Keys, user_id: int, data: bytes) -> Keys:
    """Decrypt, then recompute the synthetic IV with the id from the file name."""
    if len(data) != 80:
        raise BadFile(f"a user file is 80 bytes, not {len(data)}")
    iv = data[:16]
    plain = cbc_decrypt(server_key.enc, iv, data[16:])
    if not hmac.compare_digest(_user_iv(server_key, user_id, plain), iv):
        raise BadFile("synthetic IV does not verify")
    return Keys(plain[:32], plain[32:])


def read_msg(server_key: Keys, file_id: int, data: bytes) -> StoredMessage:
    """Length, tag with ``n`` from the name, decryption, strict unpadding, header."""
    if len(data) < 80 or (len(data) - 32) % 16:
        raise BadFile(f"a .msg file of {len(data)} bytes")
    iv, ciphertext, tag = data[:16], data[16:-16], data[-16:]
    if not hmac.compare_digest(_msg_tag(server_key, file_id, iv, ciphertext), tag):
        raise BadFile("tag does not verify")
    try:
        plain = pkcs7_unpad(cbc_decrypt(server_key.enc, iv, ciphertext))
    except OpenError:
        raise BadFile("bad padding") from None
    if len(plain) < 32:
        raise BadFile("no 32-byte header")
    recipient, sender = struct.unpack(">QQ", plain[:16])
    if recipient == 0:
        raise BadFile("recipient 0")
    return StoredMessage(recipient, sender, plain[16:32], plain[32:])


def msg_file_size(blob_size: int) -> int:
    """``16 + 16*(floor((32+L)/16)+1) + 16`` for an e2e blob of ``L`` bytes."""
    return 16 + 16 * ((32 + blob_size) // 16 + 1) + 16


def read_notice(server_key: Keys, file_id: int, data: bytes) -> Notice:
    """Open with ``n`` from the name; a non-zero user and 1 to 4096 bytes of data."""
    plain = _open(server_key, NOTICE_LABEL + u64(file_id), data)
    if len(plain) < 16:
        raise BadFile("no notice header")
    user_id, created_ms = struct.unpack(">QQ", plain[:16])
    notice = Notice(user_id, created_ms, plain[16:])
    if user_id == 0 or not 1 <= len(notice.data) <= MAX_NOTICE_DATA:
        raise BadFile("notice out of bounds")
    return notice


def read_enrollment(server_key: Keys, data: bytes) -> dict[int, int]:
    """User id -> token expiry (Unix ms); entries sorted, ids non-zero and unique."""
    plain = _open(server_key, ENROLLMENT_LABEL, data)
    if len(plain) < 4:
        raise BadFile("no count")
    (count,) = struct.unpack(">I", plain[:4])
    if len(plain) != 4 + 16 * count:
        raise BadFile("count does not match the length")
    entries = list(struct.iter_unpack(">QQ", plain[4:]))
    ids = [user_id for user_id, _ in entries]
    if ids != sorted(set(ids)) or 0 in ids:
        raise BadFile("ids not sorted, unique and non-zero")
    return dict(entries)


# -- a whole directory -----------------------------------------------------------------


@dataclass
class DataDirectory:
    """What a data directory holds, as far as its files authenticate."""

    check_ok: bool = False
    users: dict[int, Keys] = field(default_factory=dict)
    enrolling: dict[int, int] = field(default_factory=dict)
    pending: dict[int, StoredMessage] = field(default_factory=dict)  # by file id n
    notices: dict[int, Notice] = field(default_factory=dict)  # by notice id n
    bad: dict[Path, str] = field(default_factory=dict)  # failed their check
    unexpected: list[Path] = field(default_factory=list)  # names outside the layout

    def pending_for(self, recipient: int) -> list[tuple[int, StoredMessage]]:
        """A recipient's ``(n, message)`` in arrival order: ascending ``n``."""
        return [(n, m) for n, m in sorted(self.pending.items()) if m.recipient == recipient]

    def notices_for(self, user_id: int) -> list[tuple[int, Notice]]:
        """A user's ``(n, notice)`` in the order they were kept: ascending ``n``."""
        return [(n, x) for n, x in sorted(self.notices.items()) if x.user_id == user_id]


def _file_id(name: str, suffix: str) -> int | None:
    """The u64 in a ``<decimal><suffix>`` name, else None."""
    stem = name.removesuffix(suffix)
    if stem == name or not _DECIMAL.fullmatch(stem) or int(stem) >= 1 << 64:
        return None
    return int(stem)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def scan(data_dir: Path, server_key: Keys | None = None) -> DataDirectory:
    """Read and authenticate every file of ``data_dir`` (key: its server.key by default)."""
    server_key = load_server_key(data_dir / "server.key") if server_key is None else server_key
    found = DataDirectory()
    try:
        read_check(server_key, (data_dir / "server.check").read_bytes())
        found.check_ok = True
    except (BadFile, FileNotFoundError):
        pass
    state = data_dir / "enrollment.state"  # absent until the first enrolment
    if state.exists():
        try:
            found.enrolling = read_enrollment(server_key, state.read_bytes())
        except BadFile as error:
            found.bad[state] = str(error)
    _scan_files(data_dir / "users", ".user", partial(read_user, server_key), found.users, found)
    _scan_files(data_dir / "pending", ".msg", partial(read_msg, server_key), found.pending, found)
    _scan_files(
        data_dir / "notices", ".notice", partial(read_notice, server_key), found.notices, found
    )
    return found


def _scan_files(
    directory: Path,
    suffix: str,
    read: Callable[[int, bytes], Any],
    into: dict[int, Any],
    found: DataDirectory,
) -> None:
    """Read each ``<n><suffix>`` file of ``directory`` into ``into``; note the rest."""
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if _is_temporary(path.name):
            continue
        number = _file_id(path.name, suffix)
        if number is None or (suffix == ".user" and number == 0):  # user ids are never 0
            found.unexpected.append(path)
        elif path.is_symlink() or not path.is_file():
            found.bad[path] = "not a regular file"
        else:
            try:
                into[number] = read(number, path.read_bytes())
            except BadFile as error:
                found.bad[path] = str(error)


# -- writing ---------------------------------------------------------------------------


def make_check(server_key: Keys) -> bytes:
    return seal(server_key, CHECK_LABEL, CHECK_TEXT)


def make_user(server_key: Keys, user_id: int, keys: Keys) -> bytes:
    """Synthetic IV: the same user and keys always give the same 80 bytes."""
    iv = _user_iv(server_key, user_id, keys.enc + keys.auth)
    return iv + cbc_encrypt(server_key.enc, iv, keys.enc + keys.auth)


def make_msg(server_key: Keys, file_id: int, message: StoredMessage) -> bytes:
    iv = os.urandom(16)
    plain = u64(message.recipient) + u64(message.sender) + message.msg_id + message.blob
    ciphertext = cbc_encrypt(server_key.enc, iv, pkcs7_pad(plain))
    return iv + ciphertext + _msg_tag(server_key, file_id, iv, ciphertext)


def make_notice(server_key: Keys, file_id: int, notice: Notice) -> bytes:
    plain = u64(notice.user_id) + u64(notice.created_ms) + notice.data
    return seal(server_key, NOTICE_LABEL + u64(file_id), plain)


def make_enrollment(server_key: Keys, table: dict[int, int]) -> bytes:
    entries = b"".join(u64(user_id) + u64(table[user_id]) for user_id in sorted(table))
    return seal(server_key, ENROLLMENT_LABEL, u32(len(table)) + entries)


def file_id(sequence: int) -> int:
    """``n = (sequence << 16) | 16 random bits``."""
    return sequence << SEQ_SHIFT | int.from_bytes(os.urandom(2), "big")


def write_file(path: Path, data: bytes) -> None:
    """Atomically: a ``.NAME.PID.RANDOM.tmp`` file, fsync, rename, fsync the directory."""
    temporary = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.rename(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
