"""Child of the disk-failure tests: one scenario on a real, failing filesystem.

``python -m tests.storage.fs_child SCENARIO WORKDIR``; exits 0 when every check
passed, 77 (with the reason on stderr) when this machine cannot set the
scenario up, anything else on failure.  ``full`` and ``readonly`` mount a
private tmpfs and must run in their own mount namespace (``unshare -m``);
``denied`` must run without CAP_DAC_OVERRIDE; ``fsize`` sets RLIMIT_FSIZE.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, task

from enclaves.crypto import KeyPair
from enclaves.storage.filestore import PENDING_DIR, FileStorage
from enclaves.storage.interface import StorageFailed

CANNOT = 77
A, B = 101, 202


def cannot(reason: str) -> None:
    sys.stderr.write(f"cannot set up: {reason}\n")
    sys.stderr.flush()
    os._exit(CANNOT)


def mount_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        cannot(f"mount tmpfs: {done.stderr.strip()}")


def remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def msg_id(number: int) -> bytes:
    return number.to_bytes(16, "big")


async def expect_failed(d: defer.Deferred, reason: str) -> None:
    try:
        await d
    except StorageFailed as error:
        assert reason in str(error), str(error)
    else:
        raise AssertionError(f"no StorageFailed ({reason})")


async def check_intact(storage: FileStorage, stored: dict[bytes, bytes]) -> None:
    """Every acknowledged message is there and whole; nothing else is."""
    pending = await storage.pending_for(A)
    assert {m.msg_id: m.blob for m in pending} == stored, "stored messages changed"
    names = os.listdir(storage.data_dir / PENDING_DIR)
    assert not [n for n in names if n.endswith(".tmp")], names
    assert len(names) == len(stored)


def new_storage(data_dir: Path, keys: KeyPair, reactor: object) -> FileStorage:
    storage = FileStorage(data_dir, keys, max_pending_count=10**6, reactor=reactor)
    storage.startService()
    return storage


async def restart_and_check(
    storage: FileStorage, keys: KeyPair, reactor: object, stored: dict[bytes, bytes]
) -> None:
    await storage.stopService()
    again = new_storage(storage.data_dir, keys, reactor)
    try:
        await check_intact(again, stored)
        assert os.listdir(again.data_dir / "quarantine") == []
    finally:
        await again.stopService()


async def full(reactor: object, work: Path) -> None:
    mnt = work / "mnt"
    mount_tmpfs(mnt, "256k")
    keys = KeyPair.generate()
    storage = new_storage(mnt / "data", keys, reactor)
    await storage.add_user(A, KeyPair.generate(), None)
    stored: dict[bytes, bytes] = {}
    failed = None
    for number in range(1000):  # 256 KiB fills long before
        blob = os.urandom(4096)
        try:
            await storage.store_message(A, B, msg_id(number), blob)
        except StorageFailed as error:
            failed = str(error)
            break
        stored[msg_id(number)] = blob
    assert failed is not None and "disk is full" in failed, failed
    assert stored, "nothing fitted at all"
    await check_intact(storage, stored)
    # A burst of concurrent stores on a full disk: each either fails or is durable.
    burst = {msg_id(5000 + i): os.urandom(1024) for i in range(16)}
    results = await defer.DeferredList(
        [storage.store_message(A, B, mid, blob) for mid, blob in burst.items()],
        consumeErrors=True,
    )
    for (ok, value), (mid, blob) in zip(results, burst.items(), strict=True):
        if ok:
            stored[mid] = blob
        else:
            assert value.check(StorageFailed), value
    await check_intact(storage, stored)
    # Users and enrollment state on a full disk: a clear failure, nothing half-made.
    try:
        await storage.add_user(B, KeyPair.generate(), 10**12)
    except StorageFailed as error:
        assert "disk is full" in str(error), str(error)
        assert await storage.load_user(B) is None
    # Space freed: storing works again.
    first = (await storage.pending_for(A))[0]
    await storage.remove_message(first.file_id)
    del stored[first.msg_id]
    await storage.store_message(A, B, msg_id(9999), b"after")
    stored[msg_id(9999)] = b"after"
    await check_intact(storage, stored)
    await restart_and_check(storage, keys, reactor, stored)


async def readonly(reactor: object, work: Path) -> None:
    mnt = work / "mnt"
    mount_tmpfs(mnt, "4m")
    keys = KeyPair.generate()
    storage = new_storage(mnt / "data", keys, reactor)
    old = KeyPair.generate()
    await storage.add_user(A, old, None)
    stored = {msg_id(i): b"m%d" % i for i in range(3)}
    for mid, blob in stored.items():
        await storage.store_message(A, B, mid, blob)
    remount(mnt, "ro")
    await expect_failed(storage.store_message(A, B, msg_id(50), b"x"), "read-only")
    await expect_failed(storage.add_user(B, KeyPair.generate(), None), "read-only")
    await expect_failed(storage.replace_user_keys(A, KeyPair.generate()), "read-only")
    assert (await storage.load_user(A)).keys == old
    first = (await storage.pending_for(A))[0]
    await expect_failed(storage.remove_message(first.file_id), "read-only")
    await expect_failed(storage.remove_user(A), "read-only")
    assert await storage.list_users() == [A]
    await check_intact(storage, stored)
    remount(mnt, "rw")
    await storage.store_message(A, B, msg_id(51), b"again")
    stored[msg_id(51)] = b"again"
    await restart_and_check(storage, keys, reactor, stored)


async def denied(reactor: object, work: Path) -> None:
    probe = work / "probe"
    probe.mkdir(mode=0o500)
    try:
        (probe / "x").write_bytes(b"")
    except PermissionError:
        pass
    else:
        cannot("permission bits do not bind this process (CAP_DAC_OVERRIDE?)")
    keys = KeyPair.generate()
    data_dir = work / "data"
    storage = new_storage(data_dir, keys, reactor)
    old = KeyPair.generate()
    await storage.add_user(A, old, None)
    stored = {msg_id(i): b"m%d" % i for i in range(3)}
    for mid, blob in stored.items():
        await storage.store_message(A, B, mid, blob)
    locked = [data_dir, data_dir / "users", data_dir / "pending"]
    for path in locked:
        path.chmod(0o500)
    await expect_failed(storage.store_message(A, B, msg_id(50), b"x"), "permission denied")
    await expect_failed(storage.replace_user_keys(A, KeyPair.generate()), "permission denied")
    assert (await storage.load_user(A)).keys == old
    await check_intact(storage, stored)
    for path in locked:
        path.chmod(0o700)
    await storage.store_message(A, B, msg_id(51), b"again")
    stored[msg_id(51)] = b"again"
    await restart_and_check(storage, keys, reactor, stored)


async def fsize(reactor: object, work: Path) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    keys = KeyPair.generate()
    storage = new_storage(work / "data", keys, reactor)
    await storage.add_user(A, KeyPair.generate(), None)
    stored = {msg_id(i): b"m%d" % i for i in range(3)}
    for mid, blob in stored.items():
        await storage.store_message(A, B, mid, blob)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    await expect_failed(storage.store_message(A, B, msg_id(50), b"x" * 4096), "file size limit")
    await storage.store_message(A, B, msg_id(51), b"small")
    stored[msg_id(51)] = b"small"
    await check_intact(storage, stored)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    await restart_and_check(storage, keys, reactor, stored)


SCENARIOS = {"full": full, "readonly": readonly, "denied": denied, "fsize": fsize}


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    try:
        task.react(lambda reactor: defer.ensureDeferred(SCENARIOS[scenario](reactor, workdir)))
    except SystemExit as done:
        # A failed check may leave pool threads behind: exit without them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(done.code if isinstance(done.code, int) else 1)
