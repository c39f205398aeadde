"""Kill test: SIGKILL the server under two-way load; nothing ACCEPTED is lost or doubled.

Each test client keeps an outbox (every SEND not yet ACCEPTED, resent after
each reconnect) and de-duplicates DELIVERs by msg_id before handing them to
its "application" list, as DESIGN.md §4 asks of real clients.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from enclaves.client.connection import ClientConnection
from enclaves.crypto import KeyPair
from enclaves.inner import Accepted, Deliver, Error, InnerMessage, Received, Send
from tests.daemon import Daemon
from tests.system.helpers import login, make_users

pytestmark = pytest.mark.system

A, B = 111, 222
KILLS = 4


class App:
    """A minimal durable-in-memory client: outbox, resend, de-dup."""

    def __init__(self, daemon: Daemon, user_id: int, keys: KeyPair, peer: int) -> None:
        self.daemon, self.user_id, self.keys, self.peer = daemon, user_id, keys, peer
        self.conn: ClientConnection | None = None
        self.outbox: dict[bytes, Send] = {}
        self.accepted: set[bytes] = set()
        self.sent: set[bytes] = set()
        self.seen: set[bytes] = set()
        self.application: list[bytes] = []
        self.errors: list[Error] = []

    def on_message(self, message: InnerMessage) -> None:
        assert self.conn is not None
        if isinstance(message, Accepted):
            if self.outbox.pop(message.msg_id, None) is not None:
                self.accepted.add(message.msg_id)
        elif isinstance(message, Deliver):
            if message.msg_id not in self.seen:
                self.seen.add(message.msg_id)
                self.application.append(message.msg_id)
            self.conn.send(Received(message.msg_id))
        elif isinstance(message, Error) and message.msg_id != bytes(16):
            self.errors.append(message)

    async def connect(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                conn = await login(self.daemon, self.user_id, self.keys)
            except Exception:
                await deferLater(reactor, 0.05)
                continue
            conn.inbox = None  # type: ignore[assignment]
            conn.on_message = self.on_message
            self.conn = conn
            for send in list(self.outbox.values()):
                conn.send(send)
            return
        raise TimeoutError("could not reconnect")

    @property
    def live(self) -> bool:
        return self.conn is not None and self.conn.established

    def send_new(self) -> None:
        send = Send(os.urandom(16), self.peer, os.urandom(200))
        self.outbox[send.msg_id] = send
        self.sent.add(send.msg_id)
        if self.live:
            assert self.conn is not None
            self.conn.send(send)


async def load(apps: list[App], seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for app in apps:
            for _ in range(5):
                app.send_new()
        await deferLater(reactor, 0.005)


@pytest_twisted.ensureDeferred
async def test_sigkill_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    ka, kb = KeyPair.generate(), KeyPair.generate()
    # No quota in the way: a slow machine stores a longer backlog, and a
    # QUOTA_EXCEEDED refusal is not what this test is about.
    daemon = Daemon(tmp_path, "--message-rate=100000", "--max-pending=1000000")
    await make_users(daemon.data_dir, {A: ka, B: kb})
    daemon.start()
    apps = [App(daemon, A, ka, B), App(daemon, B, kb, A)]
    try:
        for _ in range(KILLS):
            for app in apps:
                if not app.live:
                    await app.connect(time.monotonic() + 20)
            await load(apps, 0.3)
            # B goes offline: A's messages now go through storage when the kill comes.
            assert apps[1].conn is not None
            await apps[1].conn.disconnect()
            await load(apps, 0.3)
            daemon.kill()
            for app in apps:
                if app.conn is not None:
                    await app.conn.closed.addTimeout(10, reactor)
            daemon.start()
        # Drain: reconnect, resend, until every sent message is accepted and seen.
        for app in apps:
            await app.connect(time.monotonic() + 20)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(not app.outbox for app in apps) and all(
                other.accepted <= app.seen for app, other in (apps, apps[::-1])
            ):
                break
            await deferLater(reactor, 0.05)
    finally:
        for app in apps:
            if app.live:
                assert app.conn is not None
                await app.conn.disconnect()
        assert daemon.stop() == 0, daemon.log_text()
    a, b = apps
    assert not a.errors and not b.errors
    for sender, recipient in ((a, b), (b, a)):
        assert sender.accepted, "the load produced no traffic"
        assert not sender.outbox, "messages never ACCEPTED"
        assert sender.accepted == sender.sent
        assert sender.accepted <= set(recipient.application)
        assert len(recipient.application) == len(set(recipient.application))
        assert set(recipient.application) <= sender.sent
