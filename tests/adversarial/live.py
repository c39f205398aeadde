"""A live daemon with an honest pair: the check every adversarial and fault test ends with.

After each attack, :meth:`Live.check` proves the daemon still serves: the
honest users A and B log in (from ``bind``, a loopback source address, when
127.0.0.1 itself is rate limited), exchange a message (SEND, DELIVER,
RECEIVED, DELIVERED), and the daemon's log holds no Traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from enclaves.client.connection import ClientConnection, connect
from enclaves.crypto import KeyPair
from enclaves.inner import Deliver, Delivered, InnerMessage, Ping, Pong, Received, Send
from tests.daemon import Daemon
from tests.system.helpers import expect, make_users

T = TypeVar("T", bound=InnerMessage)

A, B = 1_000_001, 2_000_002


class Live:
    """A ``twistd -n enclaves`` on a free port with users made on disk first."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        users: dict[int, KeyPair] | None = None,
        daemon: Daemon | None = None,
        setup_dir: Path | None = None,
    ) -> None:
        """``daemon`` replaces the default one; ``setup_dir`` is where this process
        writes the users (its data directory, unless that is out of reach)."""
        self.daemon = daemon or Daemon(workdir, *extra)
        self.setup_dir = setup_dir or self.daemon.data_dir
        self.keys: dict[int, KeyPair] = {A: KeyPair.generate(), B: KeyPair.generate()}
        self.keys.update(users or {})

    @property
    def port(self) -> int:
        return self.daemon.port

    async def start(self) -> Live:
        await make_users(self.setup_dir, self.keys)
        self.daemon.start()
        return self

    def endpoint(self, bind: str | None = None, port: int | None = None) -> str:
        where = f"tcp:host=127.0.0.1:port={port or self.port}"
        return where + (f":bindAddress={bind}" if bind else "")

    def login(
        self, user_id: int, bind: str | None = None, port: int | None = None, **kw: Any
    ) -> Deferred[ClientConnection]:
        """Log ``user_id`` in (through ``port``, e.g. a proxy, if given)."""
        return connect(reactor, self.endpoint(bind, port), user_id, self.keys[user_id], **kw)

    async def exchange(
        self, a: ClientConnection, b: ClientConnection, blob: bytes = b"honest"
    ) -> bytes:
        """a sends b one message; b receives and acknowledges it; a hears DELIVERED.

        b acknowledges every other DELIVER on the way, as any client does: left
        over from the test before (stored, or a copy whose removal was still
        being written at this login), unacknowledged they would fill b's window
        and hold a's message in storage behind them."""
        msg_id = os.urandom(16)
        a.send(Send(msg_id, b.user_id, blob))

        def ours(message: Deliver) -> bool:
            if message.msg_id != msg_id:
                b.send(Received(message.msg_id))
            return message.msg_id == msg_id

        got = await expect(b, Deliver, where=ours)
        assert (got.sender, got.blob) == (a.user_id, blob)
        b.send(Received(msg_id))
        await expect(a, Delivered, where=lambda m: m.msg_id == msg_id)
        return msg_id

    async def check(self, bind: str | None = None) -> None:
        """The daemon still serves an honest pair, and logged no Traceback."""
        assert self.daemon.process is not None and self.daemon.process.poll() is None, (
            "the daemon died: " + self.log_text()[-20000:]
        )
        a = await self.login(A, bind)
        b = await self.login(B, bind)
        try:
            await self.exchange(a, b)
            await self.exchange(b, a)
        finally:
            await a.disconnect()
            await b.disconnect()
        self.assert_clean_log()

    def log_text(self) -> str:
        """The whole log, rotated parts (twistd rotates at 1 MB) included."""
        path = self.daemon.log_path
        parts = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
        return "".join(p.read_text() for p in [*parts, path] if p.exists())

    def assert_clean_log(self) -> None:
        log = self.log_text()
        assert "Traceback" not in log, log[-20000:]

    def stop(self) -> None:
        """SIGTERM; the daemon must exit 0 with a clean log."""
        status = self.daemon.stop()
        assert status == 0, self.daemon.log_text()
        self.assert_clean_log()


async def barrier(conn: ClientConnection) -> list[InnerMessage]:
    """Everything the daemon sent ``conn`` before answering a PING sent now.

    One round trip instead of a quiet spell: whatever the daemon had already
    queued for ``conn`` when it read the PING arrives before the PONG.  Use it
    only once the daemon has read the event being checked.
    """
    nonce = int.from_bytes(os.urandom(8), "big")
    conn.send(Ping(nonce))
    seen: list[InnerMessage] = []
    await expect(conn, Pong, where=lambda m: m.nonce == nonce, seen=seen)
    return seen


async def drain(conn: ClientConnection, kind: type[T], count: int, **kw: Any) -> list[T]:
    """The next ``count`` messages of ``kind`` (others are skipped)."""
    return [await expect(conn, kind, **kw) for _ in range(count)]


Predicate = Callable[[bytes], bool]
