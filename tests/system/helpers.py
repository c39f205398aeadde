"""Shared pieces of the system tests: users made on disk, clients over real TCP."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from enclaves.client.connection import ClientConnection, connect
from enclaves.crypto import KeyPair
from enclaves.inner import InnerMessage
from enclaves.serverkey import open_server_key
from enclaves.storage.filestore import FileStorage
from tests.daemon import Daemon

T = TypeVar("T", bound=InnerMessage)


async def make_users(
    data_dir: Path, users: dict[int, KeyPair], enrolling_s: float | None = None
) -> None:
    """Store ``users`` in ``data_dir`` with FileStorage (before the daemon runs)."""
    keys, _ = open_server_key(data_dir, None)
    storage = FileStorage(data_dir, keys, reactor=reactor)
    storage.startService()
    try:
        expires = None if enrolling_s is None else int((time.time() + enrolling_s) * 1000)
        for user_id, user_keys in users.items():
            await storage.add_user(user_id, user_keys, expires)
    finally:
        await storage.stopService()


def login(daemon: Daemon, user_id: int, keys: KeyPair) -> Deferred[ClientConnection]:
    return connect(reactor, f"tcp:127.0.0.1:{daemon.port}", user_id, keys)


async def expect(
    conn: ClientConnection,
    kind: type[T],
    timeout: float = 10.0,
    where: Callable[[T], bool] = lambda m: True,
    seen: list[InnerMessage] | None = None,
) -> T:
    """The next message of ``kind`` matching ``where``; others go to ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {kind.__name__} within {timeout}s")
        message: Any = await conn.inbox.get().addTimeout(left, reactor)
        if isinstance(message, kind) and where(message):
            return message
        if seen is not None:
            seen.append(message)


async def quiet(conn: ClientConnection, seconds: float = 0.3) -> list[InnerMessage]:
    """Everything that arrives within ``seconds``."""
    out: list[InnerMessage] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await conn.inbox.get().addTimeout(left, reactor))
        except Exception:
            break
    return out
