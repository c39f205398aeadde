"""The keystore file: real Argon2id at the floor, real files, mode 0600, refusals."""

from __future__ import annotations

import os
import stat
import struct
import unicodedata
from pathlib import Path

import pytest

from enclaves.client import keystore as ks
from enclaves.client.keystore import (
    FLOOR,
    HEADER_SIZE,
    BadPassphrase,
    KdfParams,
    Keystore,
    KeystoreError,
    encode_header,
)
from enclaves.client.state import ClientState
from enclaves.crypto import KeyPair

STATE = ClientState(42, KeyPair(bytes([1]) * 32, bytes([2]) * 32), bytes(range(32)), "tcp:h:1")
PASS = "correct horse battery staple"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One keystore made once (each Argon2id run costs ~0.1-0.3 s)."""
    path = tmp_path_factory.mktemp("ks") / "keystore"
    Keystore.create(path, PASS, STATE)
    return path


def copy(store: Path, tmp_path: Path, data: bytes | None = None) -> Path:
    target = tmp_path / "keystore"
    target.write_bytes(store.read_bytes() if data is None else data)
    return target


def test_create_and_unlock(store: Path) -> None:
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    data = store.read_bytes()
    assert data[:8] == b"ENCLAVKS"
    assert struct.unpack(">HBIII", data[8:23]) == (1, 1, 65536, 3, 4)
    keystore, state = Keystore.unlock(store, PASS)
    assert state == STATE
    assert PASS not in repr(keystore)


def test_wrong_passphrase_and_tampering_give_the_same_error(store: Path, tmp_path: Path) -> None:
    with pytest.raises(BadPassphrase) as wrong:
        Keystore.unlock(store, PASS + "!")
    data = store.read_bytes()
    messages = {str(wrong.value)}
    # Salt, body and tag: any change is indistinguishable from a wrong passphrase.
    for offset in (HEADER_SIZE - 1, HEADER_SIZE + 20, len(data) - 1):
        bad = bytearray(data)
        bad[offset] ^= 0x10
        with pytest.raises(BadPassphrase) as info:
            Keystore.unlock(copy(store, tmp_path, bytes(bad)), PASS)
        messages.add(str(info.value))
    assert messages == {"wrong passphrase, or the keystore file is damaged"}


def test_in_range_parameter_change_is_caught_by_the_mac(store: Path, tmp_path: Path) -> None:
    data = bytearray(store.read_bytes())
    data[8 + 2 + 1 + 4 : 8 + 2 + 1 + 8] = struct.pack(">I", 4)  # t = 3 -> 4
    with pytest.raises(BadPassphrase):
        Keystore.unlock(copy(store, tmp_path, bytes(data)), PASS)


@pytest.mark.parametrize(
    "params",
    [
        KdfParams(65535, 3, 4),
        KdfParams(65536, 2, 4),
        KdfParams(65536, 3, 3),
        KdfParams(1024 * 1024 + 1, 3, 4),
        KdfParams(4 * 1024 * 1024, 3, 4),
        KdfParams(65536, 21, 4),
        KdfParams(65536, 3, 17),
    ],
)
def test_parameters_outside_the_range_are_refused(
    store: Path, tmp_path: Path, params: KdfParams
) -> None:
    data = encode_header(params, bytes(16)) + store.read_bytes()[HEADER_SIZE:]
    with pytest.raises(KeystoreError, match="outside the allowed range"):
        Keystore.unlock(copy(store, tmp_path, data), PASS)
    with pytest.raises(KeystoreError):
        Keystore.create(tmp_path / "new", PASS, STATE, params=params)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not an Enclaves keystore"),
        (b"ENCLAVKS", "not an Enclaves keystore"),
        (b"NOTAKEYS" + bytes(100), "not an Enclaves keystore"),
        (b"ENCLAVKS" + struct.pack(">H", 2) + bytes(100), "version 2"),
        (b"ENCLAVKS" + struct.pack(">HB", 1, 9) + bytes(100), "unknown key-derivation"),
    ],
)
def test_structural_refusals(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(KeystoreError, match=match):
        Keystore.unlock(copy(Path(), tmp_path, data), PASS)


def test_truncated_file_is_refused_and_kept(store: Path, tmp_path: Path) -> None:
    damaged = store.read_bytes()[:-5]
    path = copy(store, tmp_path, damaged)
    with pytest.raises(BadPassphrase):
        Keystore.unlock(path, PASS)
    with pytest.raises(KeystoreError, match="already exists"):
        Keystore.create(path, PASS, STATE)
    assert path.read_bytes() == damaged  # never overwritten


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="no keystore"):
        Keystore.unlock(tmp_path / "absent", PASS)


def test_save_reuses_the_derived_keys(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = copy(store, tmp_path)
    keystore, state = Keystore.unlock(path, PASS)
    runs = []
    real = ks.derive_keys
    monkeypatch.setattr(ks, "derive_keys", lambda *a: runs.append(1) or real(*a))
    before = path.read_bytes()
    changed = ClientState(42, state.server_keys, state.identity_private, "tls:other:2")
    keystore.save(changed)
    keystore.save(changed)
    assert runs == []
    after = path.read_bytes()
    assert after[:HEADER_SIZE] == before[:HEADER_SIZE]  # same salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.undo()
    assert Keystore.unlock(path, PASS)[1].endpoint == "tls:other:2"


def test_change_passphrase_draws_a_new_salt(store: Path, tmp_path: Path) -> None:
    path = copy(store, tmp_path)
    keystore, state = Keystore.unlock(path, PASS)
    old_header = path.read_bytes()[:HEADER_SIZE]
    keystore.change_passphrase("new passphrase", state)
    assert path.read_bytes()[:HEADER_SIZE] != old_header
    with pytest.raises(BadPassphrase):
        Keystore.unlock(path, PASS)
    assert Keystore.unlock(path, "new passphrase")[1] == state
    keystore.save(state)  # keeps working under the new keys
    assert Keystore.unlock(path, "new passphrase")[1] == state


def test_a_passphrase_change_that_missed_the_directory_sync_keeps_the_new_keys(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is under the new passphrase (only the directory's sync
    failed): later saves must use it too, not write under the old one."""
    import errno

    import enclaves.atomic
    from enclaves.atomic import NotSynced

    def dir_fsync_fails(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    path = copy(store, tmp_path)
    keystore, state = Keystore.unlock(path, PASS)
    monkeypatch.setattr(enclaves.atomic, "fsync_dir", dir_fsync_fails)
    with pytest.raises(NotSynced):
        keystore.change_passphrase("new passphrase", state)
    monkeypatch.undo()
    keystore.save(state)
    with pytest.raises(BadPassphrase):
        Keystore.unlock(path, PASS)
    assert Keystore.unlock(path, "new passphrase")[1] == state


def test_passphrase_is_nfc_normalised(tmp_path: Path) -> None:
    composed = "caf\u00e9 \u00fcber"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    Keystore.create(tmp_path / "k", decomposed, STATE)
    assert Keystore.unlock(tmp_path / "k", composed)[1] == STATE


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError):
        Keystore.create(tmp_path / "k", "", STATE)


def test_floor_is_rfc9106_second_option() -> None:
    assert KdfParams(64 * 1024, 3, 4) == FLOOR


def test_no_temp_files_left(store: Path, tmp_path: Path) -> None:
    path = copy(store, tmp_path)
    keystore, state = Keystore.unlock(path, PASS)
    keystore.save(state)
    assert sorted(os.listdir(tmp_path)) == ["keystore"]


def test_one_client_per_keystore(tmp_path: Path) -> None:
    """A second process locking the same keystore is refused (two clients
    would overwrite each other's saves); the lock goes with the process."""
    import subprocess
    import sys

    from enclaves.client.keystore import KeystoreError, lock_keystore

    path = tmp_path / "keystore"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib; from enclaves.client.keystore import lock_keystore; "
         f"lock_keystore(pathlib.Path({str(path)!r})); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(KeystoreError, match="in use by another enclaves client"):
            lock_keystore(path)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    lock_keystore(path)  # free again
    assert (tmp_path / "keystore.lock").stat().st_mode & 0o777 == 0o600


def test_a_lock_file_is_removed_only_without_a_keystore(tmp_path: Path) -> None:
    """remove_lock (a failed enroll) leaves nothing; with a keystore the lock
    file stays; a lock file removed while held is not mistaken for the new one."""
    import fcntl
    import os

    from enclaves.client.keystore import lock_keystore, remove_lock

    path = tmp_path / "keystore"
    lock = tmp_path / "keystore.lock"
    fd = lock_keystore(path)
    stale = os.open(lock, os.O_RDWR)  # another client opened it, not locked yet
    remove_lock(path, fd)
    assert not lock.exists()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old file: free, but gone
    fd = lock_keystore(path)  # a new file: the one that counts
    assert os.path.samestat(os.fstat(fd), os.stat(lock))
    os.close(stale)
    path.write_bytes(b"ENCLAVKS")
    remove_lock(path, fd)
    assert lock.exists()
