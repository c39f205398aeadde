"""The daemon's disk fills up, or turns read-only, while it serves.

The data directory is on a small tmpfs in a private mount namespace
(tests/faults/namespace.py); where the machine cannot set that up the tests
skip with the reason.  Invariant: every message the daemon answered ACCEPTED
is delivered exactly once to the recipient's application; a message it could
not store gets STORAGE_FAILED with its msg_id (the session stays open, the
client keeps it); nothing stored earlier is lost; the daemon serves on and
writes again once space is freed or the disk is writable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from enclaves.client.connection import ClientConnection
from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode
from enclaves.inner import Accepted, Deliver, Error, Received, Rotate, Send
from tests.adversarial.live import A, B, Live
from tests.faults.namespace import MountNamespace, NamespacedDaemon
from tests.system.helpers import expect, quiet

pytestmark = pytest.mark.system


async def outcome(conn: ClientConnection, msg_id: bytes, timeout: float = 10.0) -> Any:
    """The daemon's answer to one SEND: ACCEPTED or an ERROR for that msg_id."""
    return await expect(
        conn,
        object,  # type: ignore[arg-type]
        timeout,
        where=lambda m: isinstance(m, Accepted | Error) and m.msg_id == msg_id,
    )


async def receive_all(conn: ClientConnection, seconds: float = 1.0) -> list[bytes]:
    """Everything delivered until a quiet spell; each acknowledged."""
    got = []
    for message in await quiet(conn, seconds):
        if isinstance(message, Deliver):
            got.append(message.msg_id)
            conn.send(Received(message.msg_id))
    return got


async def until_empty(pending: Path, conn: ClientConnection) -> None:
    """Wait (bounded) until the daemon has deleted every delivered message."""
    for _ in range(100):
        if not list(pending.iterdir()):
            return
        await quiet(conn, 0.05)
    raise AssertionError(f"delivered messages never deleted: {sorted(pending.iterdir())}")


async def namespaced_live(tmp_path: Path, size: str) -> tuple[Live, MountNamespace]:
    ns = MountNamespace(tmp_path / "mnt", size).start()
    daemon = NamespacedDaemon(tmp_path, ns, "--max-pending=100000")
    live = Live(tmp_path, daemon=daemon, setup_dir=ns.outside(daemon.data_dir))
    await live.start()
    return live, ns


@pytest_twisted.ensureDeferred
async def test_disk_full(tmp_path: Path) -> None:
    """A sends 8 KiB messages to offline B until the 512 KiB disk is full.  The one
    that does not fit gets STORAGE_FAILED; B then gets exactly the ACCEPTED ones,
    in order, once; their deletion frees space and the next message is stored
    and survives a SIGKILL of the daemon."""
    live, ns = await namespaced_live(tmp_path, "512k")
    try:
        a = await live.login(A)
        accepted: list[bytes] = []
        refused = None
        for _ in range(200):  # 512 KiB fills long before
            msg_id = os.urandom(16)
            a.send(Send(msg_id, B, os.urandom(8192)))
            answer = await outcome(a, msg_id)
            if isinstance(answer, Error):
                refused = answer
                break
            accepted.append(msg_id)
        assert refused is not None, "the disk never filled"
        assert refused.code == ErrorCode.STORAGE_FAILED and accepted
        assert a.established  # a per-message error: the session goes on
        b = await live.login(B)
        assert await receive_all(b) == accepted
        await b.disconnect()
        await until_empty(ns.outside(live.daemon.data_dir) / "pending", a)
        after = os.urandom(16)
        a.send(Send(after, B, b"there is room again"))
        assert isinstance(await outcome(a, after), Accepted)
        live.daemon.kill()
        await a.closed.addTimeout(10, reactor)
        live.daemon.start()
        b = await live.login(B)
        assert await receive_all(b) == [after]
        await b.disconnect()
        await live.check()
        live.stop()
    finally:
        ns.stop()


@pytest_twisted.ensureDeferred
async def test_data_directory_turns_read_only(tmp_path: Path) -> None:
    """The data filesystem is remounted read-only under the running daemon.  A new
    message and a key rotation get STORAGE_FAILED; B still receives what was
    stored (reads work; the copies cannot be deleted, so B sees them again
    later and drops them by msg_id); after a remount read-write everything
    works, and B's application has each ACCEPTED message exactly once.  A
    restart while the disk is read-only starts and serves reads the same way."""
    live, ns = await namespaced_live(tmp_path, "4m")
    try:
        a = await live.login(A)
        stored = []
        for n in range(3):
            stored.append(os.urandom(16))
            a.send(Send(stored[-1], B, b"before %d" % n))
            assert isinstance(await outcome(a, stored[-1]), Accepted)
        ns.remount("ro")
        refused = os.urandom(16)
        a.send(Send(refused, B, b"read-only now"))
        answer = await outcome(a, refused)
        assert isinstance(answer, Error) and answer.code == ErrorCode.STORAGE_FAILED
        new = KeyPair.generate()
        a.send(Rotate(new.enc, new.auth))
        error = await expect(a, Error)
        assert error.code == ErrorCode.STORAGE_FAILED and a.established
        application: list[bytes] = []
        b = await live.login(B)
        first = await receive_all(b)
        assert first == stored
        application += [m for m in first if m not in application]
        await b.disconnect()
        await a.disconnect()
        # A restart on the read-only disk serves what it can: reads, not writes.
        live.stop()
        live.daemon.start()
        a, b = await live.login(A), await live.login(B)
        again = await receive_all(b)
        assert again == stored  # still not deletable: delivered again, dropped by msg_id
        await b.disconnect()
        a.send(Send(refused, B, b"read-only now"))
        assert (await outcome(a, refused)).code == ErrorCode.STORAGE_FAILED
        ns.remount("rw")
        a.send(Send(refused, B, b"read-only now"))  # the client's retry
        assert isinstance(await outcome(a, refused), Accepted)
        b = await live.login(B)
        application += [m for m in await receive_all(b) if m not in application]
        assert application == [*stored, refused]
        await b.disconnect()
        # Deletions are group-committed: a login racing them may see a copy
        # again (dropped by msg_id).  Once they are done, nothing is left.
        await until_empty(ns.outside(live.daemon.data_dir) / "pending", b)
        b = await live.login(B)
        assert await receive_all(b, 0.5) == []
        await b.disconnect()
        await a.disconnect()
        await live.check()
        live.stop()
    finally:
        ns.stop()
