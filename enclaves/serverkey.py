"""The server key (DESIGN.md §7): 64 raw bytes, mode 0600, bound to its data directory."""

from __future__ import annotations

import stat
from pathlib import Path

from enclaves.atomic import create_exclusive
from enclaves.crypto import CryptoError, KeyPair, Sealer

__all__ = ["StartupError", "CHECK_FILE", "KEY_FILE", "open_server_key"]

KEY_FILE = "server.key"
CHECK_FILE = "server.check"
_CHECK_AAD = b"enclaves/v1/check"
_CHECK_TEXT = b"enclaves data directory v1"


class StartupError(Exception):
    """A condition that must stop start-up; the message is one line for the admin."""


def _ensure_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise StartupError(f"cannot create data directory {data_dir}: {error.strerror}") from None
    if not data_dir.is_dir():
        raise StartupError(f"data directory {data_dir} is not a directory")


def _read_key(key_file: Path) -> KeyPair:
    try:
        info = key_file.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StartupError(
                f"key file {key_file} is readable by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {key_file}"
            )
        raw = key_file.read_bytes()
    except OSError as error:
        raise StartupError(f"cannot read key file {key_file}: {error.strerror}") from None
    if len(raw) != 64:
        raise StartupError(f"key file {key_file} is {len(raw)} bytes; a server key is exactly 64")
    try:
        return KeyPair.from_bytes(raw)
    except ValueError:
        raise StartupError(f"key file {key_file} is not a valid server key") from None


def open_server_key(data_dir: Path, key_file: Path | None = None) -> tuple[KeyPair, bool]:
    """Load the server key, or make one on first start.

    Returns the key and whether it was created now.  Raises
    :class:`StartupError` if the key is missing for an initialised data
    directory, unreadable, too widely readable, or belongs to another data
    directory.
    """
    data_dir = Path(data_dir)
    key_file = Path(key_file) if key_file is not None else data_dir / KEY_FILE
    _ensure_data_dir(data_dir)
    check_file = data_dir / CHECK_FILE
    created = False
    if not key_file.exists():
        if check_file.exists():
            raise StartupError(
                f"key file {key_file} is missing, but {data_dir} was set up with a "
                "key; restore the key file (a new key could not read the data)"
            )
        try:
            key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_exclusive(key_file, KeyPair.generate().to_bytes(), 0o600)
        except OSError as error:
            raise StartupError(f"cannot create key file {key_file}: {error.strerror}") from None
        created = True
    keys = _read_key(key_file)
    sealer = Sealer(keys)
    if check_file.exists():
        try:
            if sealer.open(_CHECK_AAD, check_file.read_bytes()) != _CHECK_TEXT:
                raise CryptoError()
        except CryptoError:
            raise StartupError(
                f"key file {key_file} does not belong to data directory {data_dir}"
            ) from None
        except OSError as error:
            raise StartupError(f"cannot read check file {check_file}: {error.strerror}") from None
    else:
        try:
            create_exclusive(check_file, sealer.seal(_CHECK_AAD, _CHECK_TEXT), 0o600)
        except OSError as error:
            raise StartupError(f"cannot write check file {check_file}: {error.strerror}") from None
    return keys, created
