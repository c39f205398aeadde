"""Notices end to end: a real ``twistd -n enclaves`` and real client processes.

The sender quits before its recipient reads; the recipient comes online
later and reads; the sender sees ``[delivered]`` at its next start, once,
also when the server was restarted in between (docs/protocol.rst, "Notices").
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytest_twisted

from enclaves.storage.filestore import NOTICES_DIR
from tests.daemon import Daemon
from tests.system.clients import Client, chat
from tests.system.test_client import chatting_pair

pytestmark = pytest.mark.system


def wait_notices(daemon: Daemon, count: int, timeout: float = 20.0) -> None:
    """Poll (bounded) until the data directory holds ``count`` notice files."""
    directory = daemon.data_dir / NOTICES_DIR
    deadline = time.monotonic() + timeout
    while True:
        names = [n for n in directory.iterdir() if n.name.endswith(".notice")]
        if len(names) == count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(names)} notices, not {count}:\n{daemon.log_text()}")
        time.sleep(0.1)


def settle(client: Client) -> None:
    """Let the client print what the server sent at login (``/help`` marks the end)."""
    client.send("/help")
    client.expect(r"^\[help\] /msg ")


@pytest_twisted.ensureDeferred
async def test_sender_sees_delivered_at_its_next_start_also_after_a_server_restart(
    tmp_path: Path,
) -> None:
    daemon = Daemon(tmp_path)
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        a.send(f"/verify {ids['b']} yes")
        a.expect(r"^\[trust\] \d+ is now verified$")
        assert b.quit() == 0

        # 1. No server restart: a quits, b reads later, a's next start says delivered.
        a.send(f"/msg {ids['b']} first")
        first = a.expect(r"^\[sent\] id=([0-9a-f]{8}) ").group(1)
        a.expect(rf"^\[accepted\] id={first} ")
        assert a.quit() == 0
        b = chat(ks["b"])
        running.append(b)
        b.expect(r": first$")
        wait_notices(daemon, 1)
        assert b.quit() == 0
        a = chat(ks["a"])
        running.append(a)
        a.expect(rf"^\[delivered\] id={first} to ")
        wait_notices(daemon, 0)
        settle(a)
        assert len(a.seen(r"^\[delivered\] ")) == 1

        # 2. Across a server restart.
        a.send(f"/msg {ids['b']} second")
        second = a.expect(r"^\[sent\] id=([0-9a-f]{8}) ").group(1)
        a.expect(rf"^\[accepted\] id={second} ")
        assert a.quit() == 0
        b = chat(ks["b"])
        running.append(b)
        b.expect(r": second$")
        wait_notices(daemon, 1)
        assert b.quit() == 0
        assert daemon.stop() == 0, daemon.log_text()
        daemon.start()
        a = chat(ks["a"])
        running.append(a)
        a.expect(rf"^\[delivered\] id={second} to ")
        wait_notices(daemon, 0)
        settle(a)
        assert a.seen(r"^\[delivered\] ") == [a.seen(rf"^\[delivered\] id={second} ")[0]]

        # 3. Once only: the next start says nothing more.
        assert a.quit() == 0
        a = chat(ks["a"])
        running.append(a)
        settle(a)
        assert not a.seen(r"^\[delivered\] ")
        for client in running:
            assert client.quit() == 0, client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()
