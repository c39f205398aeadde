"""FileStorage through its Deferreds, on a real data directory and a real reactor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from enclaves.crypto import KeyPair
from enclaves.storage.filestore import (
    ENROLLMENT_FILE,
    PENDING_DIR,
    QUARANTINE_DIR,
    SEQ_SHIFT,
    USERS_DIR,
    FileStorage,
)
from enclaves.storage.interface import (
    IStorage,
    KeysReplaced,
    PendingSummary,
    QuotaExceeded,
    StorageFailed,
    UnknownUser,
    UserExists,
    UserRecord,
)
from tests.storage.helpers import make_storage, msg_id

A, B, C = 11, 22, 33


def test_implements_interface(data_dir: Path, keys: KeyPair) -> None:
    storage = FileStorage(data_dir, keys)
    assert verifyObject(IStorage, storage)
    assert storage.max_pending_count == 1000
    assert storage.max_pending_bytes == 64 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_user_round_trip_and_rotation(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    try:
        ka, kb = KeyPair.generate(), KeyPair.generate()
        await storage.add_user(A, ka, 1_000_000)
        await storage.add_user(B, kb, None)
        assert await storage.load_user(A) == UserRecord(A, ka, 1_000_000)
        assert (await storage.load_user(A)).enrolling
        assert await storage.load_user(B) == UserRecord(B, kb, None)
        assert await storage.load_user(C) is None
        assert await storage.list_users() == [A, B]
        assert (data_dir / USERS_DIR / f"{A}.user").stat().st_size == 80
        with pytest.raises(UserExists):
            await storage.add_user(A, kb, None)
        new = KeyPair.generate()
        await storage.replace_user_keys(A, new)
        assert await storage.load_user(A) == UserRecord(A, new, None)
        with pytest.raises(UnknownUser):
            await storage.replace_user_keys(C, new)
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert await again.load_user(A) == UserRecord(A, new, None)
        assert await again.load_user(B) == UserRecord(B, kb, None)
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_a_rotation_replacing_keys_no_longer_current_stores_nothing(
    data_dir: Path, keys: KeyPair
) -> None:
    """``replacing``: two rotations from the same keys (two sessions of one
    token, say), stored one at a time: the first wins, the second fails
    KeysReplaced and writes nothing; the user stays as the first left it."""
    storage = make_storage(data_dir, keys)
    try:
        token, first, second = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
        await storage.add_user(A, token, 1_000_000)
        one = storage.replace_user_keys(A, first, {token})
        two = storage.replace_user_keys(A, second, {token})
        await one
        with pytest.raises(KeysReplaced, match="replaced meanwhile"):
            await two
        assert await storage.load_user(A) == UserRecord(A, first, None)
        await storage.replace_user_keys(A, second, {token, first})  # first is current: fine
        assert await storage.load_user(A) == UserRecord(A, second, None)
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert await again.load_user(A) == UserRecord(A, second, None)
    finally:
        await again.stopService()


@pytest.mark.parametrize("failing_syncs", [1, 1000])
@pytest_twisted.ensureDeferred
async def test_new_keys_whose_directory_sync_fails_are_taken_back(
    data_dir: Path, keys: KeyPair, monkeypatch: pytest.MonkeyPatch, failing_syncs: int
) -> None:
    """The new ``.user`` is renamed into place but its directory's fsync
    fails: ROTATED would promise keys a crash could take back.  The rotation
    fails, the old file is put back (its own sync failing too, or not), and
    memory and disk both keep the old keys, still enrolling."""
    import errno

    import enclaves.atomic

    storage = make_storage(data_dir, keys)
    token, new = KeyPair.generate(), KeyPair.generate()
    try:
        await storage.add_user(A, token, 1_000_000)
        real = enclaves.atomic.fsync_dir
        left = [failing_syncs]

        def dir_fsync(directory: Path) -> None:
            if left[0] > 0:
                left[0] -= 1
                raise OSError(errno.EIO, "Input/output error")
            real(directory)

        monkeypatch.setattr(enclaves.atomic, "fsync_dir", dir_fsync)
        with pytest.raises(StorageFailed, match="could not store the new keys"):
            await storage.replace_user_keys(A, new, {token})
        monkeypatch.undo()
        assert await storage.load_user(A) == UserRecord(A, token, 1_000_000)
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert await again.load_user(A) == UserRecord(A, token, 1_000_000)
        await again.replace_user_keys(A, new, {token})  # the disk is well again
        assert await again.load_user(A) == UserRecord(A, new, None)
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_enrollment_survives_restart(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), 123_456_789)
        await storage.add_user(B, KeyPair.generate(), 987)
        await storage.replace_user_keys(B, KeyPair.generate())
    finally:
        await storage.stopService()
    assert (data_dir / ENROLLMENT_FILE).exists()
    again = make_storage(data_dir, keys)
    try:
        assert (await again.load_user(A)).enrollment_expires_ms == 123_456_789
        assert (await again.load_user(B)).enrollment_expires_ms is None
        assert await again.enrollments() == {A: 123_456_789}
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_message_round_trip_order_and_remove(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        await storage.add_user(B, KeyPair.generate(), None)
        ids = [await storage.store_message(A, B, msg_id(i), b"x" * i) for i in range(5)]
        other = await storage.store_message(B, A, msg_id(99), b"to b")
        assert ids == sorted(ids)
        names = {p.name for p in (data_dir / PENDING_DIR).iterdir()}
        assert names == {f"{n}.msg" for n in [*ids, other]}
        pending = await storage.pending_for(A)
        assert [m.file_id for m in pending] == ids
        assert [(m.recipient, m.sender, m.msg_id, m.blob) for m in pending] == [
            (A, B, msg_id(i), b"x" * i) for i in range(5)
        ]
        assert await storage.pending_summary() == {
            A: PendingSummary(5, 10),
            B: PendingSummary(1, 4),
        }
        await storage.remove_message(ids[1])
        await storage.remove_message(ids[1])  # absent: still fine
        assert [m.file_id for m in await storage.pending_for(A)] == [ids[0], *ids[2:]]
        assert not (data_dir / PENDING_DIR / f"{ids[1]}.msg").exists()
        assert await storage.pending_for(C) == []
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_concurrent_stores_keep_arrival_order_across_restart(
    data_dir: Path, keys: KeyPair
) -> None:
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        from twisted.internet.defer import gatherResults

        ids = await gatherResults(
            [storage.store_message(A, B, msg_id(i), bytes([i])) for i in range(50)]
        )
        assert len(set(ids)) == 50
        assert [m.blob for m in await storage.pending_for(A)] == [bytes([i]) for i in range(50)]
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert [m.blob for m in await again.pending_for(A)] == [bytes([i]) for i in range(50)]
        later = await again.store_message(A, B, msg_id(50), b"later")
        assert later >> SEQ_SHIFT > max(ids) >> SEQ_SHIFT
        assert (await again.pending_for(A))[-1].blob == b"later"
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_quota_count_and_bytes(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys, max_pending_count=3, max_pending_bytes=100)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        await storage.add_user(B, KeyPair.generate(), None)
        for i in range(3):
            await storage.store_message(A, B, msg_id(i), b"m")
        with pytest.raises(QuotaExceeded, match="3 pending messages"):
            await storage.store_message(A, B, msg_id(3), b"m")
        await storage.store_message(B, A, msg_id(4), b"y" * 60)
        with pytest.raises(QuotaExceeded, match="limit of 100"):
            await storage.store_message(B, A, msg_id(5), b"y" * 41)
        await storage.store_message(B, A, msg_id(6), b"y" * 40)
        # Nothing stored earlier was dropped.
        assert [m.msg_id for m in await storage.pending_for(A)] == [msg_id(i) for i in range(3)]
        assert len(await storage.pending_for(B)) == 2
        # Quota frees up after delivery.
        first = (await storage.pending_for(A))[0]
        await storage.remove_message(first.file_id)
        await storage.store_message(A, B, msg_id(7), b"m")
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_quota_counts_stores_in_flight(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys, max_pending_count=2)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        first = storage.store_message(A, B, msg_id(1), b"1")
        second = storage.store_message(A, B, msg_id(2), b"2")
        with pytest.raises(QuotaExceeded):
            await storage.store_message(A, B, msg_id(3), b"3")
        await first
        await second
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_store_for_unknown_user_and_bad_arguments(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    try:
        with pytest.raises(UnknownUser):
            await storage.store_message(A, B, msg_id(1), b"x")
        await storage.add_user(A, KeyPair.generate(), None)
        with pytest.raises(ValueError, match="msg_id"):
            await storage.store_message(A, B, b"short", b"x")
        with pytest.raises(ValueError, match="non-zero"):
            await storage.add_user(0, KeyPair.generate(), None)
        assert os.listdir(data_dir / PENDING_DIR) == []
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_remove_user_deletes_everything(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), 5_000)
        await storage.add_user(B, KeyPair.generate(), None)
        for i in range(4):
            await storage.store_message(A, B, msg_id(i), b"a")
        kept = await storage.store_message(B, A, msg_id(9), b"b")
        in_flight = storage.store_message(A, B, msg_id(10), b"late")
        gone = await storage.remove_user(A)
        assert sorted(gone) == [(B, msg_id(i)) for i in (0, 1, 2, 3, 10)]
        await in_flight
        with pytest.raises(UnknownUser):
            await storage.remove_user(A)
        with pytest.raises(UnknownUser):
            await storage.store_message(A, B, msg_id(11), b"x")
        assert await storage.load_user(A) is None
        assert await storage.pending_for(A) == []
        assert sorted(os.listdir(data_dir / PENDING_DIR)) == [f"{kept}.msg"]
        assert os.listdir(data_dir / USERS_DIR) == [f"{B}.user"]
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert await again.list_users() == [B]
        assert again._enrollment == {}
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_remove_user_deletes_a_damaged_message_unlisted(
    data_dir: Path, keys: KeyPair
) -> None:
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        await storage.add_user(B, KeyPair.generate(), None)
        ids = [await storage.store_message(A, B, msg_id(i), b"m") for i in range(2)]
        path = data_dir / PENDING_DIR / f"{ids[0]}.msg"
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        assert await storage.remove_user(A) == [(B, msg_id(1))]
        assert os.listdir(data_dir / PENDING_DIR) == []
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_inventory_lists_every_file(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), 77)
        file_id = await storage.store_message(A, B, msg_id(1), b"hello")
        (data_dir / QUARANTINE_DIR / "junk.msg").write_bytes(b"bad")
        entries = {e.name: e for e in await storage.inventory()}
        assert entries[f"users/{A}.user"].size == 80
        assert "enrolling" in entries[f"users/{A}.user"].description
        assert entries[f"pending/{file_id}.msg"].description == f"pending message for {A} (5 bytes)"
        assert entries[ENROLLMENT_FILE].description == "enrollment state"
        assert "quarantined" in entries["quarantine/junk.msg"].description
    finally:
        await storage.stopService()


def test_second_server_on_same_directory_refused(data_dir: Path, keys: KeyPair) -> None:
    first = FileStorage(data_dir, keys)
    first.load()
    try:
        with pytest.raises(StorageFailed, match="another Enclaves server"):
            FileStorage(data_dir, keys).load()
    finally:
        first._release_lock()


@pytest_twisted.ensureDeferred
async def test_stray_temp_files_removed_at_start(data_dir: Path, keys: KeyPair) -> None:
    storage = make_storage(data_dir, keys)
    await storage.add_user(A, KeyPair.generate(), None)
    await storage.stopService()
    stray = data_dir / PENDING_DIR / ".123.msg.999.tmp"
    stray.write_bytes(b"partial")
    stray_user = data_dir / USERS_DIR / f".{A}.user.999.tmp"
    stray_user.write_bytes(b"partial")
    again = make_storage(data_dir, keys)
    try:
        assert not stray.exists() and not stray_user.exists()
        assert await again.list_users() == [A]
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_not_running_fails_cleanly(data_dir: Path, keys: KeyPair) -> None:
    storage = FileStorage(data_dir, keys)
    with pytest.raises(StorageFailed, match="not running"):
        await storage.add_user(A, KeyPair.generate(), None)


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_stores_in_flight_and_restart_same_object(
    data_dir: Path, keys: KeyPair
) -> None:
    storage = make_storage(data_dir, keys)
    await storage.add_user(A, KeyPair.generate(), None)
    stores = [storage.store_message(A, B, msg_id(i), b"x") for i in range(20)]
    stopping = storage.stopService()
    with pytest.raises(StorageFailed, match="not running"):
        await storage.store_message(A, B, msg_id(99), b"late")
    await stopping
    ids = [await d for d in stores]
    assert sorted(os.listdir(data_dir / PENDING_DIR)) == sorted(f"{n}.msg" for n in ids)
    storage.startService()
    try:
        assert [m.file_id for m in await storage.pending_for(A)] == ids
        assert await storage.list_users() == [A]
        assert (await storage.pending_summary())[A].count == 20
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_disk_work_never_on_the_reactor_thread(
    data_dir: Path, keys: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    storage = make_storage(data_dir, keys)
    real_fsync, real_open = os.fsync, os.open
    threads: list[str] = []

    def fsync(fd: int) -> None:
        threads.append(threading.current_thread().name)
        real_fsync(fd)

    def open_(*args: object, **kwargs: object) -> int:
        threads.append(threading.current_thread().name)
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", open_)
    try:
        await storage.add_user(A, KeyPair.generate(), 1)
        await storage.replace_user_keys(A, KeyPair.generate())
        file_id = await storage.store_message(A, B, msg_id(1), b"x")
        await storage.pending_for(A)
        await storage.remove_message(file_id)
        await storage.inventory()
        await storage.remove_user(A)
    finally:
        monkeypatch.undo()
        await storage.stopService()
    assert threads, "no file was opened or synced"
    main = threading.main_thread().name
    assert main not in threads


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_concurrent_stores_one_batch_at_a_time(
    data_dir: Path, keys: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from twisted.internet.defer import DeferredSemaphore, gatherResults

    storage = make_storage(data_dir, keys)
    real = FileStorage._apply_batch
    sizes: list[int] = []
    running = [0, 0]  # now, most at once
    lock = threading.Lock()

    def apply_batch(self: FileStorage, ops: list[object]) -> object:
        with lock:
            running[0] += 1
            running[1] = max(running)
        try:
            return real(self, ops)  # type: ignore[arg-type]
        finally:
            with lock:
                running[0] -= 1
                sizes.append(len(ops))

    monkeypatch.setattr(FileStorage, "_apply_batch", apply_batch)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        # A client keeping 50 stores in flight, refilling as each one fires.
        sem = DeferredSemaphore(50)
        ids = await gatherResults(
            [sem.run(storage.store_message, A, B, msg_id(i), b"x") for i in range(400)]
        )
    finally:
        await storage.stopService()
    assert len(set(ids)) == 400
    assert sum(sizes) == 400
    assert running[1] == 1, "two group commits ran at once"
    assert len(sizes) <= 20, f"stores were not grouped: {sizes}"


@pytest_twisted.ensureDeferred
async def test_a_user_revoked_while_rotating_stays_revoked(data_dir: Path, keys: KeyPair) -> None:
    """remove_user takes the user out of memory at once; a key rotation whose
    file write was in flight must not bring it back."""
    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), 5_000)
        rotation = storage.replace_user_keys(A, KeyPair.generate())
        removal = storage.remove_user(A)
        with pytest.raises(UnknownUser):
            await rotation
        await removal
        assert await storage.load_user(A) is None
        assert await storage.list_users() == []
        assert await storage.enrollments() == {}
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert await again.list_users() == []
    finally:
        await again.stopService()


def pending_names(data_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(data_dir / PENDING_DIR) if n.endswith(".msg"))


@pytest_twisted.ensureDeferred
async def test_a_resent_message_is_stored_once_and_not_counted_again(
    data_dir: Path, keys: KeyPair
) -> None:
    """A client resends what was not ACCEPTED, with the same msg_id: the copy
    already stored answers it (docs/storage.rst, "Resent messages")."""
    storage = make_storage(data_dir, keys, max_pending_count=2)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        first = await storage.store_message(A, B, msg_id(1), b"one")
        second = await storage.store_message(A, B, msg_id(2), b"two")
        # The quota is full, yet the resends are answered with their copies.
        assert await storage.store_message(A, B, msg_id(1), b"one") == first
        assert await storage.store_message(A, B, msg_id(2), b"two") == second
        assert pending_names(data_dir) == sorted([f"{first}.msg", f"{second}.msg"])
        assert (await storage.pending_summary())[A] == PendingSummary(2, 6)
        # The same msg_id from another sender is another message.
        with pytest.raises(QuotaExceeded):
            await storage.store_message(A, C, msg_id(1), b"one")
        # Once the copy is gone (delivered), the same message is stored anew.
        await storage.remove_message(first)
        again = await storage.store_message(A, B, msg_id(1), b"one")
        assert again != first and again >> SEQ_SHIFT > second >> SEQ_SHIFT
        assert [m.msg_id for m in await storage.pending_for(A)] == [msg_id(2), msg_id(1)]
        # A revoked recipient's copies are forgotten with it.
        await storage.remove_user(A)
        await storage.add_user(A, KeyPair.generate(), None)
        fresh = await storage.store_message(A, B, msg_id(2), b"two")
        assert fresh not in (first, second, again)
        assert pending_names(data_dir) == [f"{fresh}.msg"]
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_held_message_finds_a_copy_in_flight_stored_and_after_a_restart(
    data_dir: Path, keys: KeyPair
) -> None:
    """``held_message`` answers from the index: the copy's file id (a store in
    flight: once durable), None for any other sender, msg_id or recipient,
    and None once the copy is gone.  It stores and counts nothing."""
    storage = make_storage(data_dir, keys, max_pending_count=1)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        assert await storage.held_message(A, B, msg_id(1)) is None
        storing = storage.store_message(A, B, msg_id(1), b"x")
        while_storing = storage.held_message(A, B, msg_id(1))
        file_id = await storing
        assert await while_storing == file_id
        assert await storage.held_message(A, B, msg_id(1)) == file_id
        assert await storage.held_message(A, C, msg_id(1)) is None
        assert await storage.held_message(A, B, msg_id(2)) is None
        assert await storage.held_message(C, B, msg_id(1)) is None
        assert pending_names(data_dir) == [f"{file_id}.msg"]
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys)
    try:
        assert await again.held_message(A, B, msg_id(1)) == file_id
        await again.remove_message(file_id)
        assert await again.held_message(A, B, msg_id(1)) is None
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_a_resend_during_the_store_gets_that_stores_outcome(
    data_dir: Path, keys: KeyPair
) -> None:
    storage = make_storage(data_dir, keys, max_pending_count=1)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        order: list[str] = []
        first = storage.store_message(A, B, msg_id(1), b"x")
        first.addCallback(lambda n: order.append("first") or n)
        resend = storage.store_message(A, B, msg_id(1), b"x")  # quota 1: not counted
        resend.addCallback(lambda n: order.append("resend") or n)
        file_id = await first
        assert await resend == file_id
        assert order == ["first", "resend"]
        assert pending_names(data_dir) == [f"{file_id}.msg"]
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_a_resend_during_a_failing_store_fails_as_it_does(
    data_dir: Path, keys: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    storage = make_storage(data_dir, keys)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        monkeypatch.setattr(
            FileStorage,
            "_apply_batch",
            lambda self, ops: [OSError(errno.ENOSPC, "No space left on device") for _ in ops],
        )
        first = storage.store_message(A, B, msg_id(1), b"x")
        resend = storage.store_message(A, B, msg_id(1), b"x")
        for d in (first, resend):
            with pytest.raises(StorageFailed, match="disk is full"):
                await d
        monkeypatch.undo()
        # Nothing was stored, and nothing is remembered: the next attempt stores.
        assert await storage.pending_for(A) == []
        stored = await storage.store_message(A, B, msg_id(1), b"x")
        assert pending_names(data_dir) == [f"{stored}.msg"]
    finally:
        await storage.stopService()


@pytest_twisted.ensureDeferred
async def test_a_resend_after_a_restart_finds_the_stored_copy(
    data_dir: Path, keys: KeyPair
) -> None:
    """The start-up index knows the sender and msg_id of every file."""
    storage = make_storage(data_dir, keys, max_pending_count=2)
    try:
        await storage.add_user(A, KeyPair.generate(), None)
        ids = [await storage.store_message(A, B, msg_id(i), b"m%d" % i) for i in range(2)]
    finally:
        await storage.stopService()
    again = make_storage(data_dir, keys, max_pending_count=2)
    try:
        assert [await again.store_message(A, B, msg_id(i), b"m%d" % i) for i in range(2)] == ids
        assert pending_names(data_dir) == sorted(f"{n}.msg" for n in ids)
        with pytest.raises(QuotaExceeded):
            await again.store_message(A, B, msg_id(5), b"new")
        await again.remove_message(ids[0])
        later = await again.store_message(A, B, msg_id(0), b"m0")
        assert later not in ids
        assert [m.file_id for m in await again.pending_for(A)] == [ids[1], later]
    finally:
        await again.stopService()
