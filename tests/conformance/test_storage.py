"""Data directories both ways, with real files: the conformance reader authenticates
what the real FileStorage wrote, FileStorage loads what the conformance writer wrote,
and both refuse a damaged or renamed file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted

from enclaves import inner
from enclaves.crypto import KeyPair
from enclaves.serverkey import StartupError, open_server_key
from enclaves.storage.filestore import FileStorage
from enclaves.storage.interface import StorageFailed, UserRecord
from tests.conformance import protocol as cr
from tests.conformance import storage as at_rest
from tests.conformance.bridge import to_real
from tests.conformance.protocol import Keys
from tests.conformance.storage import Notice, StoredMessage

A, B, C, D = 11, 22, 33, 2**64 - 1
HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


def real_keys(keys: Keys) -> KeyPair:
    return KeyPair(keys.enc, keys.auth)


def our_keys(keys: KeyPair) -> Keys:
    return Keys(keys.enc, keys.auth)


def random_keys() -> Keys:
    return Keys(os.urandom(32), os.urandom(32))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# -- the real server writes, the conformance reader reads ------------------------------


@pytest_twisted.ensureDeferred
async def test_the_reader_authenticates_what_the_server_wrote(data_dir: Path) -> None:
    server_key, created = open_server_key(data_dir)  # server.key and server.check
    assert created
    users = {A: KeyPair.generate(), B: KeyPair.generate(), C: KeyPair.generate()}
    delivered = inner.Delivered(os.urandom(16))
    refused = inner.Error(10, os.urandom(16), "recipient 11 already has 1000 pending messages")
    storage = FileStorage(data_dir, server_key)
    storage.startService()
    before = now_ms()
    try:
        await storage.add_user(A, users[A], None)
        await storage.add_user(B, users[B], before + HOUR_MS)  # still enrolling
        await storage.add_user(C, KeyPair.generate(), before + 2 * HOUR_MS)
        await storage.replace_user_keys(C, users[C])  # rotated: enrolled
        for size in (0, 1, 15, 16, 17, 1000):
            recipient = A if size % 2 else B
            await storage.store_message(recipient, C, os.urandom(16), os.urandom(size))
        await storage.store_notice(C, inner.encode(delivered))
        await storage.store_notice(C, inner.encode(refused))
        pending = {user: await storage.pending_for(user) for user in users}
        notices = await storage.notices_for(C)
        enrolling = await storage.enrollments()
    finally:
        await storage.stopService()
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert {p.stat().st_mode & 0o777 for p in files} == {0o600}  # "Every file ... 0600"
    found = at_rest.scan(data_dir)
    assert found.check_ok and found.bad == {} and found.unexpected == []
    assert found.users == {user: our_keys(keys) for user, keys in users.items()}
    assert found.enrolling == enrolling == {B: before + HOUR_MS}
    for user in users:
        assert found.pending_for(user) == [
            (m.file_id, StoredMessage(m.recipient, m.sender, m.msg_id, m.blob))
            for m in pending[user]
        ]
    assert len(found.pending) == 6
    for n, message in found.pending.items():  # the docs' size formula
        size = (data_dir / "pending" / f"{n}.msg").stat().st_size
        assert size == at_rest.msg_file_size(len(message.blob))
    assert [(n, notice.data) for n, notice in found.notices_for(C)] == notices
    assert all(before <= notice.created_ms <= now_ms() for notice in found.notices.values())
    kept = [cr.decode_inner(notice.data) for _, notice in found.notices_for(C)]
    assert [[to_real(m) for m in messages] for messages in kept] == [[delivered], [refused]]


# -- the conformance writer writes, the real server loads --------------------------------


class Written:
    """A data directory made by the conformance writer, and what it holds."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.key = random_keys()
        self.users = {A: random_keys(), D: random_keys()}
        self.enrolling = {D: now_ms() + HOUR_MS}
        # Sequences with gaps: the server's own ids must continue after the largest.
        self.messages = {
            at_rest.file_id(seq): StoredMessage(A if seq % 2 else D, B, os.urandom(16), blob)
            for seq, blob in ((1, b""), (2, b"x"), (3, os.urandom(48)), (7, os.urandom(300)))
        }
        delivered = cr.Inner(cr.Kind.DELIVERED, {"msg_id": os.urandom(16)})
        self.notices = {
            at_rest.file_id(seq): Notice(A, now_ms(), cr.encode_inner(delivered)) for seq in (2, 5)
        }
        self.write()

    def write(self) -> None:
        for sub in ("users", "pending", "notices"):
            (self.data_dir / sub).mkdir(mode=0o700, parents=True)
        self.data_dir.chmod(0o700)
        at_rest.write_file(self.data_dir / "server.key", self.key.enc + self.key.auth)
        at_rest.write_file(self.data_dir / "server.check", at_rest.make_check(self.key))
        for user, keys in self.users.items():
            at_rest.write_file(self.path("users", user), at_rest.make_user(self.key, user, keys))
        table = at_rest.make_enrollment(self.key, self.enrolling)
        at_rest.write_file(self.data_dir / "enrollment.state", table)
        for n, message in self.messages.items():
            at_rest.write_file(self.path("pending", n), at_rest.make_msg(self.key, n, message))
        for n, notice in self.notices.items():
            at_rest.write_file(self.path("notices", n), at_rest.make_notice(self.key, n, notice))

    def path(self, sub: str, number: int) -> Path:
        suffix = {"users": ".user", "pending": ".msg", "notices": ".notice"}[sub]
        return self.data_dir / sub / f"{number}{suffix}"

    def start(self) -> FileStorage:
        server_key, created = open_server_key(self.data_dir)  # checks server.check
        assert not created and server_key == real_keys(self.key)
        storage = FileStorage(self.data_dir, server_key)
        storage.startService()
        return storage

    def quarantined(self) -> set[str]:
        return {p.name for p in (self.data_dir / "quarantine").iterdir()}


@pytest_twisted.ensureDeferred
async def test_the_server_loads_what_the_writer_wrote(data_dir: Path) -> None:
    written = Written(data_dir)
    storage = written.start()
    try:
        assert await storage.list_users() == [A, D]
        assert await storage.load_user(A) == UserRecord(A, real_keys(written.users[A]), None)
        assert await storage.load_user(D) == UserRecord(
            D, real_keys(written.users[D]), written.enrolling[D]
        )
        for user in (A, D):
            stored = await storage.pending_for(user)
            assert [(m.file_id, m.recipient, m.sender, m.msg_id, m.blob) for m in stored] == [
                (n, *m) for n, m in sorted(written.messages.items()) if m.recipient == user
            ]
        assert await storage.notices_for(A) == [
            (n, notice.data) for n, notice in sorted(written.notices.items())
        ]
        new_message = await storage.store_message(A, B, os.urandom(16), b"after")
        new_notice = await storage.store_notice(A, inner.encode(inner.Rotated()))
        assert new_message >> at_rest.SEQ_SHIFT == 8 and new_notice >> at_rest.SEQ_SHIFT == 6
    finally:
        await storage.stopService()
    assert written.quarantined() == set()
    assert at_rest.scan(data_dir).bad == {}  # and the server's new files read back


# -- a damaged or renamed file -----------------------------------------------------------


def flip_last_byte(path: Path) -> list[Path]:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return [path]


def rename(path: Path, number: int) -> list[Path]:
    target = path.with_name(f"{number}{path.suffix}")
    path.rename(target)
    return [target]


def swap(first: Path, second: Path) -> list[Path]:
    one, other = first.read_bytes(), second.read_bytes()
    first.write_bytes(other)
    second.write_bytes(one)
    return [first, second]


def under_another_key(written: Written, n: int) -> list[Path]:
    path = written.path("pending", n)
    path.write_bytes(at_rest.make_msg(random_keys(), n, written.messages[n]))
    return [path]


DAMAGE: dict[str, Callable[[Written], list[Path]]] = {
    "user tampered": lambda w: flip_last_byte(w.path("users", A)),
    "user renamed": lambda w: rename(w.path("users", A), C),
    "users swapped": lambda w: swap(w.path("users", A), w.path("users", D)),
    "message tampered": lambda w: flip_last_byte(w.path("pending", min(w.messages))),
    "message renamed": lambda w: rename(w.path("pending", min(w.messages)), at_rest.file_id(100)),
    "message under another key": lambda w: under_another_key(w, min(w.messages)),
    "notice tampered": lambda w: flip_last_byte(w.path("notices", min(w.notices))),
    "notice renamed": lambda w: rename(w.path("notices", min(w.notices)), at_rest.file_id(9)),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
@pytest_twisted.ensureDeferred
async def test_both_refuse_a_damaged_file(
    data_dir: Path, damage: Callable[[Written], list[Path]]
) -> None:
    written = Written(data_dir)
    damaged = damage(written)
    found = at_rest.scan(data_dir)
    assert set(found.bad) == set(damaged)
    storage = written.start()  # moves what fails its check to quarantine/
    await storage.stopService()
    assert written.quarantined() == {path.name for path in damaged}
    assert not any(path.exists() for path in damaged)


def test_both_refuse_a_damaged_enrollment_state(data_dir: Path) -> None:
    written = Written(data_dir)
    state = flip_last_byte(data_dir / "enrollment.state")
    assert list(at_rest.scan(data_dir).bad) == state
    with pytest.raises(StorageFailed, match=r"enrollment\.state failed its integrity check"):
        FileStorage(data_dir, real_keys(written.key)).load()


def test_both_refuse_a_check_file_of_another_key(data_dir: Path) -> None:
    Written(data_dir)
    at_rest.write_file(data_dir / "server.check", at_rest.make_check(random_keys()))
    assert not at_rest.scan(data_dir).check_ok
    with pytest.raises(StartupError, match="does not belong to data directory"):
        open_server_key(data_dir)
