"""Resends end to end: a real ``twistd -n enclaves`` and clients of the project's
client library (docs/protocol.rst, "Delivery", "Resends").

The clean-room report this pins: three messages to an offline recipient fill
its quota (``--max-pending 3``); the sender's connection closes before the
ACCEPTEDs arrive; after reconnecting it resends them, as the protocol says,
and every resend was refused with QUOTA_EXCEEDED (a client marks such a
message failed) although the recipient later received all three.  With room
in the quota each resend was stored again: a second DELIVERED per message.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from enclaves.client.connection import ClientConnection
from enclaves.crypto import KeyPair
from enclaves.inner import Accepted, Deliver, Delivered, Directory, Error, Received, Send
from enclaves.storage.filestore import PENDING_DIR
from tests.adversarial.live import barrier
from tests.daemon import Daemon
from tests.system.helpers import expect, login, make_users

pytestmark = pytest.mark.system

A, B = 1_100_011, 2_200_022
MESSAGES = (1, 2, 3)


def mid(n: int) -> bytes:
    return struct.pack(">QQ", 0x5E5E, n)


def stored_files(daemon: Daemon, count: int, timeout: float = 20.0) -> list[str]:
    """Poll (bounded) until the data directory holds ``count`` message files."""
    directory = daemon.data_dir / PENDING_DIR
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(n.name for n in directory.iterdir() if n.name.endswith(".msg"))
        if len(names) == count:
            return names
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(names)} message files, not {count}:\n{daemon.log_text()}")
        time.sleep(0.05)


async def answers(conn: ClientConnection, count: int, timeout: float = 10.0) -> list[Any]:
    """The next ``count`` answers to SENDs (ACCEPTED or a per-message ERROR)."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(out)} answers within {timeout}s, not {count}: {out}")
        message = await conn.inbox.get().addTimeout(left, reactor)
        if isinstance(message, Accepted | Error):
            out.append(message)
    return out


async def resend_all(daemon: Daemon, keys: KeyPair) -> ClientConnection:
    """A reconnects and resends its outbox: every message must be ACCEPTED."""
    a = await login(daemon, A, keys)
    await expect(a, Directory)
    for n in MESSAGES:
        a.send(Send(mid(n), B, b"message %d" % n))
    got = await answers(a, len(MESSAGES))
    assert sorted(got, key=lambda m: m.msg_id) == [Accepted(mid(n)) for n in MESSAGES], got
    return a


@pytest_twisted.ensureDeferred
async def test_resends_of_stored_messages_are_accepted_with_the_quota_full(
    tmp_path: Path,
) -> None:
    ka, kb = KeyPair.generate(), KeyPair.generate()
    daemon = Daemon(tmp_path, "--max-pending", "3")
    await make_users(daemon.data_dir, {A: ka, B: kb})
    daemon.start()
    try:
        a = await login(daemon, A, ka)
        await expect(a, Directory)
        for n in MESSAGES:
            a.send(Send(mid(n), B, b"message %d" % n))
        await a.disconnect()  # at once: the stores are still being written
        files = stored_files(daemon, 3)

        a = await resend_all(daemon, ka)
        assert stored_files(daemon, 3) == files  # no second copy
        await a.disconnect()

        # After a restart the server still knows what it holds.
        assert daemon.stop() == 0, daemon.log_text()
        daemon.start()
        a = await resend_all(daemon, ka)
        assert stored_files(daemon, 3) == files

        # The recipient reads each message once; the sender hears DELIVERED once each.
        b = await login(daemon, B, kb)
        await expect(b, Directory)
        got = [await expect(b, Deliver) for _ in MESSAGES]
        assert [d.msg_id for d in got] == [mid(n) for n in MESSAGES]
        for d in got:
            b.send(Received(d.msg_id))
        assert not [m for m in await barrier(b) if isinstance(m, Deliver)]
        delivered = [(await expect(a, Delivered)).msg_id for _ in MESSAGES]
        assert sorted(delivered) == [mid(n) for n in MESSAGES]
        stored_files(daemon, 0)
        assert not [m for m in await barrier(a) if isinstance(m, Delivered | Error)]
        await a.disconnect()
        await b.disconnect()
        assert "Traceback" not in daemon.log_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()
