"""Tampered, truncated, swapped and foreign files are moved aside; everyone else is served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from enclaves.crypto import KeyPair, Sealer
from enclaves.serverkey import StartupError, open_server_key
from enclaves.storage.filestore import (
    ENROLLMENT_FILE,
    NOTICES_DIR,
    PENDING_DIR,
    QUARANTINE_DIR,
    USERS_DIR,
    FileStorage,
)
from enclaves.storage.formats import encode_msg
from enclaves.storage.interface import StorageFailed
from tests.storage.helpers import make_storage, msg_id

A, B, C = 11, 22, 33


async def _populate(data_dir: Path, keys: KeyPair) -> list[int]:
    storage = make_storage(data_dir, keys)
    try:
        for user in (A, B, C):
            await storage.add_user(user, KeyPair.generate(), None)
        return [await storage.store_message(A, B, msg_id(i), b"m%d" % i) for i in range(4)]
    finally:
        await storage.stopService()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _quarantined(data_dir: Path) -> list[str]:
    return sorted(os.listdir(data_dir / QUARANTINE_DIR))


@pytest_twisted.ensureDeferred
async def test_tampered_truncated_and_swapped_files_quarantined(
    data_dir: Path, keys: KeyPair
) -> None:
    ids = await _populate(data_dir, keys)
    pending = data_dir / PENDING_DIR
    users = data_dir / USERS_DIR
    _flip(pending / f"{ids[0]}.msg", 40)
    truncated = pending / f"{ids[1]}.msg"
    truncated.write_bytes(truncated.read_bytes()[:-1])
    # Swap two user files (names reveal ids; contents are bound to them).
    ua, ub = users / f"{A}.user", users / f"{B}.user"
    da, db = ua.read_bytes(), ub.read_bytes()
    ua.write_bytes(db)
    ub.write_bytes(da)
    with capturedLogs() as events:
        storage = make_storage(data_dir, keys)
    try:
        assert await storage.list_users() == [C]
        assert [m.file_id for m in await storage.pending_for(A)] == ids[2:]
        assert _quarantined(data_dir) == sorted(
            [f"{ids[0]}.msg", f"{ids[1]}.msg", f"{A}.user", f"{B}.user"]
        )
        texts = [e.get("log_format", "") for e in events]
        assert sum("failed its integrity check" in t for t in texts) == 4
        loaded = [e for e in events if "storage loaded" in e.get("log_format", "")]
        assert loaded[0]["quarantined"] == 4
        assert loaded[0]["count"] == 2
        # The server keeps working for everyone else.
        await storage.store_message(C, B, msg_id(9), b"still fine")
        assert len(await storage.pending_for(C)) == 1
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_swapped_msg_files_both_quarantined(data_dir: Path, keys: KeyPair) -> None:
    ids = await _populate(data_dir, keys)
    first, second = (data_dir / PENDING_DIR / f"{n}.msg" for n in ids[:2])
    one, two = first.read_bytes(), second.read_bytes()
    first.write_bytes(two)
    second.write_bytes(one)
    storage = make_storage(data_dir, keys)
    try:
        assert [m.file_id for m in await storage.pending_for(A)] == ids[2:]
        assert _quarantined(data_dir) == sorted(f"{n}.msg" for n in ids[:2])
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_file_sealed_under_another_key_quarantined(data_dir: Path, keys: KeyPair) -> None:
    ids = await _populate(data_dir, keys)
    foreign = encode_msg(Sealer(KeyPair.generate()), 77, A, B, msg_id(77), b"foreign")
    (data_dir / PENDING_DIR / "77.msg").write_bytes(foreign)
    storage = make_storage(data_dir, keys)
    try:
        assert [m.file_id for m in await storage.pending_for(A)] == ids
        assert _quarantined(data_dir) == ["77.msg"]
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_file_tampered_while_running_quarantined_on_read(
    data_dir: Path, keys: KeyPair
) -> None:
    ids = await _populate(data_dir, keys)
    storage = make_storage(data_dir, keys)
    try:
        _flip(data_dir / PENDING_DIR / f"{ids[2]}.msg", 20)
        with capturedLogs() as events:
            got = await storage.pending_for(A)
        assert [m.file_id for m in got] == [ids[0], ids[1], ids[3]]
        assert _quarantined(data_dir) == [f"{ids[2]}.msg"]
        assert any("failed its integrity check" in e.get("log_format", "") for e in events)
        assert (await storage.pending_summary())[A].count == 3
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_quarantine_never_overwrites(data_dir: Path, keys: KeyPair) -> None:
    ids = await _populate(data_dir, keys)
    (data_dir / QUARANTINE_DIR / f"{ids[0]}.msg").write_bytes(b"earlier")
    _flip(data_dir / PENDING_DIR / f"{ids[0]}.msg", 20)
    storage = make_storage(data_dir, keys)
    await storage.stopService()
    assert _quarantined(data_dir) == [f"{ids[0]}.msg", f"{ids[0]}.msg.1"]
    assert (data_dir / QUARANTINE_DIR / f"{ids[0]}.msg").read_bytes() == b"earlier"


@pytest_twisted.ensureDeferred
async def test_tampered_enrollment_state_refuses_start(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    await storage.add_user(A, KeyPair.generate(), 1000)
    await storage.stopService()
    _flip(data_dir / ENROLLMENT_FILE, 30)
    with pytest.raises(StorageFailed, match=r"enrollment\.state failed its integrity check"):
        FileStorage(data_dir, keys).load()
    # The lock is released after a refusal.
    (data_dir / ENROLLMENT_FILE).unlink()
    again = FileStorage(data_dir, keys)
    again.load()
    again._release_lock()


def test_wrong_server_key_refuses_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _keys, created = open_server_key(data_dir)
    assert created
    other = tmp_path / "other.key"
    other.write_bytes(KeyPair.generate().to_bytes())
    other.chmod(0o600)
    with pytest.raises(StartupError, match="does not belong"):
        open_server_key(data_dir, other)


def test_twistd_wiring_refuses_tampered_enrollment(tmp_path: Path) -> None:
    from enclaves.tap import Options, makeService

    data_dir = tmp_path / "data"
    options = Options()
    options.parseOptions(["--data-dir", str(data_dir), "--max-pending", "5"])
    top = makeService(options)
    names = [type(s).__name__ for s in top]
    assert names.index("FileStorage") < names.index("ListeningService")
    storage = next(s for s in top if isinstance(s, FileStorage))
    assert storage.max_pending_count == 5
    assert storage.max_pending_bytes == 64 * 1024 * 1024
    storage._release_lock()
    (data_dir / ENROLLMENT_FILE).write_bytes(b"\0" * 48)
    with pytest.raises(SystemExit):
        makeService(options)


@pytest_twisted.ensureDeferred
async def test_remove_user_clears_messages_orphaned_by_a_quarantined_user(
    data_dir: Path, keys: KeyPair
) -> None:
    ids = await _populate(data_dir, keys)
    _flip(data_dir / USERS_DIR / f"{A}.user", 3)
    with capturedLogs() as events:
        storage = make_storage(data_dir, keys)
    try:
        loaded = [e for e in events if "storage loaded" in e.get("log_format", "")]
        assert loaded[0]["orphans"] == 4
        assert await storage.load_user(A) is None
        assert (await storage.pending_summary())[A].count == 4
        assert sorted(await storage.remove_user(A)) == [(B, msg_id(i)) for i in range(4)]
        assert await storage.pending_summary() == {}
        assert not any(f"{n}.msg" in os.listdir(data_dir / PENDING_DIR) for n in ids)
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_key_without_check_file_moves_nothing(data_dir: Path, keys: KeyPair) -> None:
    await _populate(data_dir, keys)
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    with pytest.raises(StorageFailed, match="opens with this server key"):
        FileStorage(data_dir, KeyPair.generate()).load()
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before
    assert _quarantined(data_dir) == []
    # The right key still opens everything afterwards.
    storage = make_storage(data_dir, keys)
    try:
        assert await storage.list_users() == [A, B, C]
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_odd_files_under_data_names_are_moved_aside(data_dir: Path, keys: KeyPair) -> None:
    """A directory, a FIFO and a symlink named like data files neither stop nor
    hang the start-up (a FIFO opened for reading would block forever): each is
    moved aside like a damaged file and the rest is served."""
    ids = await _populate(data_dir, keys)
    pending, users = data_dir / PENDING_DIR, data_dir / USERS_DIR
    (pending / "900000000000.msg").mkdir()
    os.mkfifo(users / "44.user")
    os.symlink(pending / f"{ids[0]}.msg", data_dir / NOTICES_DIR / "900000000001.notice")
    storage = make_storage(data_dir, keys)
    try:
        assert await storage.list_users() == [A, B, C]
        assert [m.file_id for m in await storage.pending_for(A)] == ids
        assert _quarantined(data_dir) == ["44.user", "900000000000.msg", "900000000001.notice"]
    finally:
        await storage.stopService()
