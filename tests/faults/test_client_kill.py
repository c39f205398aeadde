"""A client SIGKILLed in the middle of sending: the daemon serves on, nothing ACCEPTED is lost.

The sender is a child process (tests/faults/sender_child.py) that streams
SENDs until it is killed -9 after some were ACCEPTED, with the recipient
online (ACCEPTED after its RECEIVED) and offline (ACCEPTED once stored).
Invariant: every msg_id the sender was told ACCEPTED reaches the recipient's
application exactly once; nothing else arrives; the daemon serves the honest
pair afterwards with no Traceback in its log.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from enclaves.client.connection import ClientConnection
from enclaves.inner import Deliver, InnerMessage, Ping, Pong, Received
from tests.adversarial.live import A, B, Live

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER = 50


class Sender(ProcessProtocol):
    """Collects the child's ACCEPTED lines; SIGKILLs it once ``KILL_AFTER`` came."""

    def __init__(self) -> None:
        self.buffer = b""
        self.accepted: list[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.killed_at = 0.0
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"ACCEPTED "):
                self.accepted.append(bytes.fromhex(line.split()[1].decode()))
        if len(self.accepted) >= KILL_AFTER and not self.killed_at:
            self.killed_at = time.monotonic()
            assert self.transport is not None
            self.transport.signalProcess("KILL")

    def processEnded(self, reason: Failure) -> None:
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(None)


def spawn(live: Live, tag: int) -> Sender:
    keys = live.keys[A]
    sender = Sender()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "tests.faults.sender_child", str(live.port), str(A)]
    argv += [keys.enc.hex(), keys.auth.hex(), str(B), str(tag)]
    reactor.spawnProcess(sender, sys.executable, argv, env=env, path=str(ROOT))  # type: ignore[attr-defined]
    return sender


class Recipient:
    """B's application: acknowledges every DELIVER, keeps each msg_id once."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.application: list[bytes] = []
        self.conn: ClientConnection | None = None
        self._pongs: dict[int, Deferred[None]] = {}

    def attach(self, conn: ClientConnection) -> None:
        self.conn = conn
        conn.on_message = self.on_message

    def barrier(self) -> Deferred[None]:
        """Fires once the daemon answered a PING sent now: it has read every
        RECEIVED sent before, and sent everything it had queued for us."""
        nonce = int.from_bytes(os.urandom(8), "big")
        waiter: Deferred[None] = Deferred()
        self._pongs[nonce] = waiter
        assert self.conn is not None
        self.conn.send(Ping(nonce))
        return waiter.addTimeout(10, reactor)

    def on_message(self, message: InnerMessage) -> None:
        if isinstance(message, Pong) and message.nonce in self._pongs:
            self._pongs.pop(message.nonce).callback(None)
        if isinstance(message, Deliver):
            self.raw.append(message.msg_id)
            if message.msg_id not in self.application:
                self.application.append(message.msg_id)
            assert self.conn is not None
            self.conn.send(Received(message.msg_id))


async def settle(live: Live, recipient: Recipient, accepted: list[bytes], ended: int) -> None:
    """Wait until every ACCEPTED message arrived, the daemon has seen the
    killed sender's session end (``ended`` such log lines: every frame it
    sent is routed by then), and three PING round trips 0.2 s apart bring no
    DELIVER: the daemon has read every RECEIVED, so nothing is in flight to
    the recipient when it disconnects.  Bounded to 30 s; the assertions
    afterwards say what is missing."""
    deadline = time.monotonic() + 30
    while not set(accepted) <= set(recipient.application) and time.monotonic() < deadline:
        await deferLater(reactor, 0.05)
    while live.log_text().count(f"session of user {A} (") < ended and time.monotonic() < deadline:
        await deferLater(reactor, 0.05)
    quiet_rounds = 0
    while quiet_rounds < 3 and time.monotonic() < deadline:
        seen = len(recipient.raw)
        await recipient.barrier()
        await deferLater(reactor, 0.2)
        quiet_rounds = quiet_rounds + 1 if len(recipient.raw) == seen else 0


@pytest_twisted.ensureDeferred
async def test_sender_killed_mid_send(tmp_path: Path) -> None:
    """SIGKILL the sending client while it streams SENDs, with B online, then offline."""
    live = await Live(tmp_path, "--message-rate=1000000", "--max-pending=1000000").start()
    b = Recipient()
    b.attach(await live.login(B))
    online = spawn(live, tag=1)
    await online.ended
    await settle(live, b, online.accepted, ended=1)
    assert b.conn is not None
    await b.conn.disconnect()
    offline = spawn(live, tag=2)
    await offline.ended
    b.attach(await live.login(B))
    await settle(live, b, offline.accepted, ended=2)
    await b.conn.disconnect()
    for sender, tag in ((online, 1), (offline, 2)):
        assert sender.killed_at and sender.signal == signal.SIGKILL, "not killed mid-send"
        got = [m for m in b.application if m[:8] == struct.pack(">Q", tag)]
        assert set(sender.accepted) <= set(got), "an ACCEPTED message was lost"
        assert len(set(sender.accepted)) == len(sender.accepted)
    assert len(b.raw) == len(set(b.raw)) == len(b.application)
    assert all(m[:8] in (struct.pack(">Q", 1), struct.pack(">Q", 2)) for m in b.application)
    assert live.log_text().count(f"user {A} logged in") == 2
    await live.check()
    live.stop()
