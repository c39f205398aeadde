"""The client's one keystore file (DESIGN.md §9, docs/client.rst).

File = ``header || seal(K, aad = header, state)``::

    header = magic "ENCLAVKS" || u16 version (1) || u8 kdf (1 = Argon2id)
             || u32 memory_kib || u32 iterations || u32 lanes || salt[16]

``K`` (enc || auth, 64 bytes) = Argon2id(NFC(passphrase) as UTF-8, salt, m, t, p).
Everything but the file's own reading and writing is pure; a wrong
passphrase and any change to the file give the same :class:`BadPassphrase`.
"""

from __future__ import annotations

import fcntl
import os
import struct
import unicodedata
from pathlib import Path

from attrs import frozen
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from enclaves.atomic import NotSynced, create_exclusive, write_atomic
from enclaves.client.state import ClientState, StateError, decode_state, encode_state
from enclaves.crypto import CryptoError, KeyPair, Sealer

__all__ = [
    "MAGIC",
    "VERSION",
    "KDF_ARGON2ID",
    "HEADER_SIZE",
    "KeystoreError",
    "BadPassphrase",
    "KdfParams",
    "FLOOR",
    "derive_keys",
    "encode_header",
    "parse_header",
    "seal_file",
    "open_file",
    "Keystore",
    "check_keystore_path",
    "lock_keystore",
    "lock_path",
    "remove_lock",
]

MAGIC = b"ENCLAVKS"
VERSION = 1
KDF_ARGON2ID = 1
SALT_SIZE = 16
_HEADER = struct.Struct(">8sHBIII16s")
HEADER_SIZE = _HEADER.size  # 39


def lock_path(path: Path) -> Path:
    """``PATH.lock`` next to the keystore (symlinks resolved)."""
    path = path.resolve()  # two symlinks to one keystore share one lock
    return path.with_name(path.name + ".lock")


def check_keystore_path(path: Path, must_exist: bool) -> None:
    """Refuse, before any lock file is made, a path that cannot be a keystore:
    a directory, something that is not a regular file, a file that is not a
    keystore, or (``must_exist``) nothing at all."""
    if path.is_dir():
        raise KeystoreError(f"{path} is a directory: give the keystore's file name")
    if not path.exists():
        if must_exist:
            raise KeystoreError(f"no keystore at {path}")
        if not path.parent.is_dir() and path.parent.exists():
            raise KeystoreError(f"{path.parent} is not a directory")
        return
    if not path.is_file():
        raise KeystoreError(f"{path} is not a regular file, so not a keystore")
    try:
        with path.open("rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise KeystoreError(f"cannot read keystore {path}: {e.strerror}") from None
    if head[: len(MAGIC)] != MAGIC:
        raise KeystoreError(f"{path} is not an Enclaves keystore; it was left untouched")


def lock_keystore(path: Path) -> int:
    """Hold ``PATH.lock`` (an exclusive ``flock``) for the rest of this
    process: one client per keystore, so two never overwrite each other's
    saves.  Returns the lock's file descriptor; the lock goes with the process.

    The lock is taken on the file that is at ``PATH.lock`` once the lock is
    held (checked by inode): a lock file removed by :func:`remove_lock` while
    another process waited to open it is never mistaken for the current one.
    """
    lock = lock_path(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(10):
        try:
            fd = os.open(lock, flags, 0o600)
        except OSError as e:
            raise KeystoreError(f"cannot open {lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KeystoreError(
                f"{path.resolve()} is in use by another enclaves client on this machine; "
                "quit that one first"
            ) from None
        except OSError:
            return fd  # a file system without locks: go on unlocked, as before locks existed
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed (or replaced) meanwhile: lock the one there now
    raise KeystoreError(f"cannot lock {lock}: it keeps being replaced")


def remove_lock(path: Path, fd: int) -> None:
    """Remove the lock file this process holds (``fd`` from
    :func:`lock_keystore`) if no keystore exists at ``path``: a failed
    enrollment leaves nothing behind.  Removed while still held, so a
    client that opened it meanwhile notices (see :func:`lock_keystore`)."""
    if path.exists():
        return
    try:
        os.unlink(lock_path(path))
    except OSError:
        pass
    os.close(fd)


class KeystoreError(Exception):
    """The keystore can not be used; the text is plain and safe to show."""


class BadPassphrase(KeystoreError):
    """Wrong passphrase, or the file was changed: deliberately not told apart."""

    def __init__(self) -> None:
        super().__init__("wrong passphrase, or the keystore file is damaged")


@frozen
class KdfParams:
    """Argon2id cost: memory in KiB, iterations, lanes."""

    memory_kib: int
    iterations: int
    lanes: int

    def check(self) -> None:
        """Refuse parameters below the floor or absurdly above it."""
        if not (
            FLOOR.memory_kib <= self.memory_kib <= _CEILING.memory_kib
            and FLOOR.iterations <= self.iterations <= _CEILING.iterations
            and FLOOR.lanes <= self.lanes <= _CEILING.lanes
        ):
            raise KeystoreError(
                "keystore refused: its key-derivation parameters are outside the allowed range"
            )


FLOOR = KdfParams(memory_kib=65536, iterations=3, lanes=4)  # RFC 9106, second option
# What a tampered header could ask for is bounded: at most 1 GiB, t = 20, p = 16.
_CEILING = KdfParams(memory_kib=1024 * 1024, iterations=20, lanes=16)


def derive_keys(passphrase: str, salt: bytes, params: KdfParams) -> KeyPair:
    """Argon2id over the NFC-normalised passphrase → 64 bytes → (enc, auth)."""
    params.check()
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    okm = Argon2id(
        salt=salt,
        length=64,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    ).derive(secret)
    try:
        return KeyPair.from_bytes(okm)
    except ValueError:  # enc == auth: impossible in practice
        raise BadPassphrase() from None


def encode_header(params: KdfParams, salt: bytes) -> bytes:
    if len(salt) != SALT_SIZE:
        raise ValueError("salt must be 16 bytes")
    return _HEADER.pack(
        MAGIC, VERSION, KDF_ARGON2ID, params.memory_kib, params.iterations, params.lanes, salt
    )


def parse_header(data: bytes) -> tuple[KdfParams, bytes]:
    """The KDF parameters and salt; refuses what is not a usable keystore header."""
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise KeystoreError("this file is not an Enclaves keystore")
    _magic, version, kdf, memory, iterations, lanes, salt = _HEADER.unpack_from(data)
    if version != VERSION:
        raise KeystoreError(f"keystore version {version} is not supported by this client")
    if kdf != KDF_ARGON2ID:
        raise KeystoreError("keystore uses an unknown key-derivation function")
    params = KdfParams(memory, iterations, lanes)
    params.check()
    return params, salt


def seal_file(sealer: Sealer, header: bytes, payload: bytes) -> bytes:
    return header + sealer.seal(header, payload)


def open_file(sealer: Sealer, data: bytes) -> bytes:
    """The payload, or :class:`BadPassphrase` (wrong keys or any change)."""
    header = data[:HEADER_SIZE]
    try:
        return sealer.open(header, data[HEADER_SIZE:])
    except CryptoError:
        raise BadPassphrase() from None


class Keystore:
    """An unlocked keystore file.

    The keys derived at unlock (or create) are kept for the session, so
    :meth:`save` costs one seal and one atomic write, not an Argon2id run; a
    fresh salt is drawn only by :meth:`change_passphrase`.
    """

    def __init__(self, path: Path, header: bytes, keys: KeyPair) -> None:
        self.path = Path(path)
        self._header = header
        self._sealer = Sealer(keys)

    def __repr__(self) -> str:
        return f"<Keystore {str(self.path)!r}>"

    @classmethod
    def create(
        cls,
        path: Path,
        passphrase: str,
        state: ClientState,
        params: KdfParams = FLOOR,
        salt: bytes | None = None,
    ) -> Keystore:
        """Write a new keystore; refuses to replace any existing file."""
        if not passphrase:
            raise KeystoreError("the passphrase must not be empty")
        salt = os.urandom(SALT_SIZE) if salt is None else salt
        header = encode_header(params, salt)
        keystore = cls(path, header, derive_keys(passphrase, salt, params))
        data = seal_file(keystore._sealer, header, encode_state(state))
        try:
            create_exclusive(keystore.path, data)
        except FileExistsError:
            raise KeystoreError(f"{path} already exists; it was left untouched") from None
        return keystore

    @classmethod
    def unlock(cls, path: Path, passphrase: str) -> tuple[Keystore, ClientState]:
        """Read, check and open the keystore at ``path``."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise KeystoreError(f"no keystore at {path}") from None
        except OSError as e:
            raise KeystoreError(f"cannot read keystore {path}: {e.strerror}") from None
        params, salt = parse_header(data)
        keys = derive_keys(passphrase, salt, params)
        keystore = cls(path, data[:HEADER_SIZE], keys)
        payload = open_file(keystore._sealer, data)
        try:
            state = decode_state(payload)
        except StateError as e:
            raise KeystoreError(f"keystore contents unreadable: {e}") from None
        return keystore, state

    def save(self, state: ClientState) -> None:
        """Seal ``state`` with the cached keys and replace the file atomically (0600)."""
        write_atomic(self.path, seal_file(self._sealer, self._header, encode_state(state)))

    def change_passphrase(
        self, passphrase: str, state: ClientState, params: KdfParams = FLOOR
    ) -> None:
        """New salt, new keys, file rewritten atomically under them."""
        if not passphrase:
            raise KeystoreError("the passphrase must not be empty")
        salt = os.urandom(SALT_SIZE)
        header = encode_header(params, salt)
        sealer = Sealer(derive_keys(passphrase, salt, params))
        try:
            write_atomic(self.path, seal_file(sealer, header, encode_state(state)))
        except NotSynced:
            # The file is under the new passphrase already: so are later saves.
            self._header, self._sealer = header, sealer
            raise
        self._header, self._sealer = header, sealer
