"""SIGKILL of the daemon at random moments, many times, under three-way load (slow).

tests/system/test_kill.py (in the default run) kills four times at fixed
points of a two-user load.  This one (``-m slow``) kills twelve times at
random moments: during the load, while recipients come and go, and right
after a restart while every client is resending its outbox.  It reuses that
test's client (outbox, resend, de-dup by msg_id).  Invariant: every message
ACCEPTED is delivered exactly once to its recipient's application, and every
message sent is eventually ACCEPTED.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from enclaves.crypto import KeyPair
from tests.daemon import Daemon
from tests.system.helpers import make_users
from tests.system.test_kill import App, load

pytestmark = [pytest.mark.system, pytest.mark.slow]

USERS = (101, 202, 303)
KILLS = 12


@pytest_twisted.ensureDeferred
async def test_repeated_sigkill_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(7)
    keys = {u: KeyPair.generate() for u in USERS}
    daemon = Daemon(tmp_path, "--message-rate=100000", "--max-pending=1000000")
    await make_users(daemon.data_dir, keys)
    daemon.start()
    ring = list(zip(USERS, USERS[1:] + USERS[:1], strict=True))
    apps = [App(daemon, u, keys[u], peer) for u, peer in ring]
    try:
        for kill in range(KILLS):
            for app in apps:
                if not app.live and rng.random() < 0.8:
                    await app.connect(time.monotonic() + 20)
            running = ensureDeferred(load(apps, 0.5))
            if kill % 3 == 2:
                await deferLater(reactor, rng.uniform(0.0, 0.05))  # amid the resends
            else:
                await deferLater(reactor, rng.uniform(0.05, 0.6))
            victim = rng.choice(apps)
            if victim.live and rng.random() < 0.5 and victim.conn is not None:
                await victim.conn.disconnect()  # a recipient goes offline mid-load
            daemon.kill()
            await running
            for app in apps:
                if app.conn is not None:
                    await app.conn.closed.addTimeout(10, reactor)
            daemon.start()
        for app in apps:
            await app.connect(time.monotonic() + 20)
        deadline = time.monotonic() + 60
        by_id = {app.user_id: app for app in apps}
        while time.monotonic() < deadline:
            if all(not app.outbox for app in apps) and all(
                app.accepted <= set(by_id[app.peer].application) for app in apps
            ):
                break
            await deferLater(reactor, 0.05)
    finally:
        for app in apps:
            if app.live and app.conn is not None:
                await app.conn.disconnect()
        assert daemon.stop() == 0, daemon.log_text()
    logs = sorted(daemon.log_path.parent.glob(daemon.log_path.name + "*"))
    assert not [p for p in logs if "Traceback" in p.read_text()]
    for app in apps:
        recipient = by_id[app.peer]
        assert not app.errors, app.errors
        assert app.accepted and not app.outbox
        assert app.accepted == app.sent
        assert app.accepted <= set(recipient.application)
        assert len(recipient.application) == len(set(recipient.application))
