"""SIGKILL of the daemon while messages are in flight between ACCEPTED and delivery.

A message stored for an offline recipient is ACCEPTED once it is on disk;
when the recipient logs in it is delivered, and it stays the daemon's until
the recipient's RECEIVED (then it is deleted and the sender gets DELIVERED).
Here the daemon is killed -9 after the DELIVER reached the recipient and
before its RECEIVED did, and also while messages to an online recipient are
delivered but not yet acknowledged (their sender has no ACCEPTED yet, so they
are still in its outbox).  Invariant: every message ACCEPTED is delivered
exactly once to the recipient's application: what was in flight is delivered
again after the restart (the application drops the repeat by msg_id), what
was acknowledged is not, and nothing is lost.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from enclaves.client.connection import ClientConnection
from enclaves.inner import Accepted, Deliver, Delivered, Received, Send
from tests.adversarial.live import A, B, Live, barrier, drain
from tests.system.helpers import expect, quiet

pytestmark = pytest.mark.system


class Application:
    """B's application: each msg_id once, whatever the daemon delivers again."""

    def __init__(self) -> None:
        self.shown: list[bytes] = []
        self.delivered: list[bytes] = []  # every DELIVER, repeats included

    def take(self, deliver: Deliver) -> None:
        self.delivered.append(deliver.msg_id)
        if deliver.msg_id not in self.shown:
            self.shown.append(deliver.msg_id)


def send_all(conn: ClientConnection, sends: list[Send]) -> None:
    for send in sends:
        conn.send(send)


@pytest_twisted.ensureDeferred
async def test_sigkill_between_accepted_and_delivery(tmp_path: Path) -> None:
    live = await Live(tmp_path).start()
    app = Application()
    a = await live.login(A)
    # Five messages to B while B is offline: each ACCEPTED once stored.
    stored = [Send(os.urandom(16), B, b"stored %d" % i) for i in range(5)]
    send_all(a, stored)
    for send in stored:
        await expect(a, Accepted, where=lambda m, s=send: m.msg_id == s.msg_id)
    # B logs in and gets all five; it acknowledges only the first two, and A
    # hears DELIVERED for those (their files are gone).
    b = await live.login(B)
    for deliver in await drain(b, Deliver, 5):
        app.take(deliver)
    assert app.shown == [s.msg_id for s in stored]
    for send in stored[:2]:
        b.send(Received(send.msg_id))
        await expect(a, Delivered, where=lambda m, s=send: m.msg_id == s.msg_id)
    # Two more while B is online: delivered at once, not acknowledged, so A has
    # no ACCEPTED for them and keeps them in its outbox.
    online = [Send(os.urandom(16), B, b"online %d" % i) for i in range(2)]
    send_all(a, online)
    for deliver in await drain(b, Deliver, 2):
        app.take(deliver)
    assert not [m for m in await barrier(a) if isinstance(m, Accepted)]
    # SIGKILL with three stored and two online messages in flight.
    live.daemon.kill()
    await a.closed.addTimeout(10, reactor)
    await b.closed.addTimeout(10, reactor)
    live.daemon.start()
    a = await live.login(A)
    send_all(a, online)  # the outbox: never ACCEPTED, so sent again
    b = await live.login(B)
    again = await drain(b, Deliver, 5)
    for deliver in again:
        app.take(deliver)
        b.send(Received(deliver.msg_id))
    assert sorted(d.msg_id for d in again) == sorted(s.msg_id for s in stored[2:] + online)
    for send in stored[2:] + online:
        await expect(a, Delivered, where=lambda m, s=send: m.msg_id == s.msg_id)
    assert not [m for m in await barrier(b) if isinstance(m, Deliver)]
    # Every message reached B's application exactly once, in order per phase.
    assert app.shown == [s.msg_id for s in stored + online]
    assert len(app.delivered) == len(stored) + len(online) + 5
    await a.disconnect()
    await b.disconnect()
    # Nothing comes back after another restart: every copy was deleted.
    live.daemon.kill()
    live.daemon.start()
    b = await live.login(B)
    assert not [m for m in await quiet(b, 0.3) if isinstance(m, Deliver)]
    await b.disconnect()
    assert not list((live.daemon.data_dir / "pending").iterdir())
    await live.check()
    live.stop()
