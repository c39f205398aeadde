"""Notices (IStorage.store_notice / notices_for / remove_notices) on both backends.

The same contract tests run against FileStorage (real files, real reactor)
and MemoryStorage; the file store's own duties (restart, expiry at start,
quarantine, layout) follow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from enclaves.crypto import KeyPair, Sealer
from enclaves.storage.filestore import NOTICES_DIR, QUARANTINE_DIR, FileStorage
from enclaves.storage.formats import MAX_NOTICE_DATA, encode_notice
from enclaves.storage.interface import NOTICE_LIFETIME, StorageFailed, UnknownUser
from enclaves.storage.memory import MemoryStorage
from tests.storage.helpers import make_storage

A, B = 11, 22
DAY = 24 * 3600.0
T0 = 1_800_000_000.0


class FakeTime:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Any:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def text_of(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(event) for event in events)


Factory = Callable[..., Any]


def gather(ds: list[Deferred[Any]]) -> Deferred[list[Any]]:
    return gatherResults(ds, consumeErrors=True)


@pytest.fixture(params=["file", "memory"])
def backend(request: pytest.FixtureRequest, data_dir: Path, keys: KeyPair) -> Any:
    """A factory of started storages of one kind; each is stopped after the test."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        if request.param == "file":
            storage: Any = make_storage(data_dir, keys, **options)
        else:
            storage = MemoryStorage(**options)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        if isinstance(storage, FileStorage) and storage.running:
            pytest_twisted.blockon(storage.stopService())


@pytest.fixture
def started(data_dir: Path, keys: KeyPair) -> Any:
    """``started(**options)``: a started FileStorage on ``data_dir``; whatever is
    still running at the end is stopped, so that a failing test cannot hang."""
    made: list[FileStorage] = []

    def make(**options: Any) -> FileStorage:
        storage = make_storage(data_dir, keys, **options)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        if storage.running:
            pytest_twisted.blockon(storage.stopService())


async def users(storage: Any, *ids: int) -> None:
    for user_id in ids:
        await storage.add_user(user_id, KeyPair.generate(), None)


async def data_of(storage: Any, user_id: int) -> list[bytes]:
    return [data for _, data in await storage.notices_for(user_id)]


@pytest_twisted.ensureDeferred
async def test_notices_round_trip_in_order_and_per_user(backend: Factory) -> None:
    storage = backend(clock=FakeTime())
    await users(storage, A, B)
    first = await storage.store_notice(A, b"one")
    await storage.store_notice(B, b"for b")
    second = await storage.store_notice(A, b"two" * 100)
    third = await storage.store_notice(A, b"\x00" * MAX_NOTICE_DATA)
    assert first < second < third
    listed = await storage.notices_for(A)
    assert listed == [(first, b"one"), (second, b"two" * 100), (third, b"\x00" * MAX_NOTICE_DATA)]
    assert await data_of(storage, B) == [b"for b"]
    await storage.remove_notices(A, [first, third, 12345])
    assert await storage.notices_for(A) == [(second, b"two" * 100)]
    await storage.remove_notices(B, [second])  # another user's id: ignored
    assert await data_of(storage, A) == [b"two" * 100]
    assert await storage.notices_for(33) == []


@pytest_twisted.ensureDeferred
async def test_notice_for_unknown_user_or_bad_size_refused(backend: Factory) -> None:
    storage = backend()
    await users(storage, A)
    with pytest.raises(UnknownUser):
        await storage.store_notice(B, b"x")
    for bad in (b"", b"x" * (MAX_NOTICE_DATA + 1)):
        with pytest.raises(ValueError):
            await storage.store_notice(A, bad)
    assert await storage.notices_for(A) == []


@pytest_twisted.ensureDeferred
async def test_the_oldest_notice_is_dropped_beyond_the_cap(
    backend: Factory, logged: list[LogEvent]
) -> None:
    storage = backend(max_notices=3)
    await users(storage, A, B)
    for i in range(5):
        await storage.store_notice(A, b"%d" % i)
    await storage.store_notice(B, b"b")
    assert await data_of(storage, A) == [b"2", b"3", b"4"]
    assert await data_of(storage, B) == [b"b"]
    if isinstance(storage, FileStorage):
        assert "has more than 3 notices; dropping the 1 oldest" in text_of(logged)
        await storage.stopService()  # lets the unlinks finish
        names = os.listdir(storage.data_dir / NOTICES_DIR)
        assert len(names) == 4, names


@pytest_twisted.ensureDeferred
async def test_notices_expire_after_their_lifetime(backend: Factory) -> None:
    clock = FakeTime()
    storage = backend(clock=clock)
    await users(storage, A)
    await storage.store_notice(A, b"old")
    clock.now += 20 * DAY
    await storage.store_notice(A, b"newer")
    clock.now += 10 * DAY + 1  # "old" is 30 days and a second old
    assert NOTICE_LIFETIME == 30 * DAY
    assert await data_of(storage, A) == [b"newer"]
    clock.now += 20 * DAY
    assert await data_of(storage, A) == []


@pytest_twisted.ensureDeferred
async def test_removing_a_user_removes_its_notices(backend: Factory) -> None:
    storage = backend()
    await users(storage, A, B)
    await storage.store_notice(A, b"a")
    await storage.store_notice(B, b"b")
    await storage.remove_user(A)
    assert await storage.notices_for(A) == []
    assert await data_of(storage, B) == [b"b"]
    with pytest.raises(UnknownUser):
        await storage.store_notice(A, b"late")
    if isinstance(storage, FileStorage):
        assert len(os.listdir(storage.data_dir / NOTICES_DIR)) == 1


@pytest_twisted.ensureDeferred
async def test_notices_listed_in_the_inventory(backend: Factory) -> None:
    storage = backend()
    await users(storage, A)
    notice_id = await storage.store_notice(A, b"abc")
    descriptions = {e.description for e in await storage.inventory()}
    assert f"notice for {A}" in descriptions
    if isinstance(storage, FileStorage):
        names = {e.name for e in await storage.inventory()}
        assert f"notices/{notice_id}.notice" in names


@pytest_twisted.ensureDeferred
async def test_a_failing_disk_refuses_the_notice(backend: Factory, monkeypatch: Any) -> None:
    storage = backend()
    await users(storage, A)
    if isinstance(storage, MemoryStorage):
        storage.fail_writes = True
    else:
        import enclaves.storage.filestore as filestore

        def full(*_: Any) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(filestore, "_write_new", full)
    with pytest.raises(StorageFailed):
        await storage.store_notice(A, b"x")
    assert await storage.notices_for(A) == []


# -- the file store's own duties -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_notices_survive_a_restart_in_order(
    data_dir: Path, keys: KeyPair, started: Any
) -> None:
    storage = started()
    await users(storage, A)
    ids = [await storage.store_notice(A, b"%d" % i) for i in range(3)]
    await storage.stopService()
    for name in os.listdir(data_dir / NOTICES_DIR):
        assert (data_dir / NOTICES_DIR / name).stat().st_mode & 0o777 == 0o600
    again = started()
    assert await again.notices_for(A) == [(n, b"%d" % i) for i, n in enumerate(ids)]
    later = await again.store_notice(A, b"later")
    assert later > ids[-1]


@pytest_twisted.ensureDeferred
async def test_removed_notices_stay_removed_after_a_restart(
    data_dir: Path, keys: KeyPair, started: Any
) -> None:
    storage = started()
    await users(storage, A)
    first = await storage.store_notice(A, b"sent")
    second = await storage.store_notice(A, b"kept")
    await storage.remove_notices(A, [first])
    assert os.listdir(data_dir / NOTICES_DIR) == [f"{second}.notice"]
    await storage.stopService()
    again = started()
    assert await again.notices_for(A) == [(second, b"kept")]


@pytest_twisted.ensureDeferred
async def test_expired_notices_are_deleted_at_start(
    data_dir: Path, keys: KeyPair, started: Any, logged: list[LogEvent]
) -> None:
    clock = FakeTime()
    storage = started(clock=clock)
    await users(storage, A)
    await storage.store_notice(A, b"old")
    clock.now += 29 * DAY
    kept = await storage.store_notice(A, b"young")
    await storage.stopService()
    clock.now += 2 * DAY
    again = started(clock=clock)
    assert os.listdir(data_dir / NOTICES_DIR) == [f"{kept}.notice"]
    assert "and 1 notices (1 expired ones dropped)" in text_of(logged)
    assert await again.notices_for(A) == [(kept, b"young")]


@pytest_twisted.ensureDeferred
async def test_a_damaged_notice_is_quarantined_and_the_rest_served(
    data_dir: Path, keys: KeyPair, started: Any, logged: list[LogEvent]
) -> None:
    storage = started()
    await users(storage, A)
    ids = [await storage.store_notice(A, b"%d" % i) for i in range(3)]
    path = data_dir / NOTICES_DIR / f"{ids[1]}.notice"
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x01
    path.write_bytes(bytes(raw))
    assert await storage.notices_for(A) == [(ids[0], b"0"), (ids[2], b"2")]
    assert f"notice {ids[1]}.notice failed its integrity check; moved to" in text_of(logged)
    assert os.listdir(data_dir / QUARANTINE_DIR) == [f"{ids[1]}.notice"]
    assert await storage.notices_for(A) == [(ids[0], b"0"), (ids[2], b"2")]


@pytest_twisted.ensureDeferred
async def test_a_notice_of_another_user_under_this_users_id_is_refused(
    data_dir: Path, keys: KeyPair, started: Any, logged: list[LogEvent]
) -> None:
    """A validly sealed notice of B put where A's notice was (same id) is not
    served to A: the user inside the file must be the one asked for."""
    storage = started()
    await users(storage, A, B)
    (notice_id,) = [await storage.store_notice(A, b"for a")]
    path = data_dir / NOTICES_DIR / f"{notice_id}.notice"
    path.write_bytes(encode_notice(Sealer(keys), notice_id, B, int(T0 * 1000), b"for b"))
    assert await storage.notices_for(A) == []
    assert "failed its integrity check" in text_of(logged)


@pytest_twisted.ensureDeferred
async def test_damaged_and_stray_notice_files_at_start(
    data_dir: Path, keys: KeyPair, started: Any, logged: list[LogEvent]
) -> None:
    storage = started()
    await users(storage, A)
    good = await storage.store_notice(A, b"good")
    bad = await storage.store_notice(A, b"bad")
    await storage.stopService()
    (data_dir / NOTICES_DIR / f"{bad}.notice").write_bytes(b"\x00" * 64)
    stray = data_dir / NOTICES_DIR / f".{good}.notice.1.2.tmp"
    stray.write_bytes(b"partial")
    again = started()
    assert not stray.exists()
    assert await again.notices_for(A) == [(good, b"good")]
    assert os.listdir(data_dir / QUARANTINE_DIR) == [f"{bad}.notice"]
    assert f"{bad}.notice failed its integrity check; moved to" in text_of(logged)


@pytest_twisted.ensureDeferred
async def test_notices_are_group_committed(
    data_dir: Path, keys: KeyPair, started: Any, monkeypatch: Any
) -> None:
    """A recipient reading a backlog from offline senders makes a notice per
    message: concurrent notice writes share pool jobs and directory fsyncs."""
    storage = started()
    await users(storage, A)
    batches: list[int] = []
    apply = storage._apply_notice_batch

    def counting(ops: list[Any]) -> list[BaseException | None]:
        batches.append(len(ops))
        return apply(ops)

    monkeypatch.setattr(storage, "_apply_notice_batch", counting)
    ids = await gather([storage.store_notice(A, b"%d" % i) for i in range(300)])
    assert sum(batches) == 300 and len(batches) <= 5, batches
    assert [data for _, data in await storage.notices_for(A)] == [b"%d" % i for i in range(300)]
    assert sorted(ids) == ids
    await storage.remove_notices(A, ids)
    assert os.listdir(data_dir / NOTICES_DIR) == []
