"""Shared helpers for the client core tests: deterministic parties and a relay."""

from __future__ import annotations

import resource
import signal
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from enclaves.client import kex
from enclaves.client.core import ClientCore, Event, SendBlob
from enclaves.client.kex import Entropy, Identity, SeededEntropy
from enclaves.crypto import KeyPair


def identity(user_id: int, seed: bytes) -> Identity:
    return Identity.from_private_bytes(user_id, SeededEntropy(seed).random_bytes(32))


def make_core(user_id: int, seed: bytes = b"", **options: float) -> ClientCore:
    entropy = SeededEntropy(b"core-%d" % user_id + seed)
    keys = KeyPair(bytes([1]) * 32, bytes([2]) * 32)
    return ClientCore.new(user_id, keys, "tcp:127.0.0.1:1", entropy=entropy, **options)


def forged_offer(impersonated: ClientCore, epoch: int) -> bytes:
    """An OFFER carrying ``impersonated``'s (public) identity key with a fresh EK and
    PQ of the forger's: what a malicious server can write, since IK is public.
    Nobody can compute the pair keys it leads to (they need IK's private half)."""
    fake = Identity(impersonated.user_id, Entropy().x25519(), impersonated.identity.public)
    return kex.make_offer(fake, epoch, Entropy(), 0.0).blob


class Relay:
    """Stands in for the server's store-and-forward: in order per recipient."""

    def __init__(self, *cores: ClientCore) -> None:
        self.cores = {c.user_id: c for c in cores}
        self.queues: dict[int, deque[tuple[int, bytes, bytes]]] = {c: deque() for c in self.cores}
        self.events: dict[int, list[Event]] = {c: [] for c in self.cores}
        self.log: list[tuple[int, SendBlob]] = []

    def post(self, sender: int, events: list[Event]) -> None:
        """Take the SendBlobs out of ``events`` into the recipients' queues."""
        for event in events:
            if isinstance(event, SendBlob):
                self.log.append((sender, event))
                self.cores[sender].on_accepted(event.msg_id)
                self.queues[event.recipient].append((sender, event.msg_id, event.blob))
            else:
                self.events[sender].append(event)

    def deliver(self, user_id: int, now: float, limit: int | None = None) -> None:
        queue = self.queues[user_id]
        count = 0
        while queue and (limit is None or count < limit):
            sender, msg_id, blob = queue.popleft()
            self.post(user_id, self.cores[user_id].handle_blob(sender, msg_id, blob, now))
            count += 1

    def flush(self, now: float, rounds: int = 20) -> None:
        for _ in range(rounds):
            if not any(self.queues.values()):
                return
            for user_id in sorted(self.queues):
                self.deliver(user_id, now)
        raise AssertionError("relay did not settle")

    def of(self, user_id: int, kind: type) -> list[Event]:
        return [e for e in self.events[user_id] if isinstance(e, kind)]


# Bytes a file may grow to while saves fail: less than a keystore's header.
SAVE_FAILS_BEYOND = 16


@contextmanager
def saves_fail() -> Iterator[None]:
    """Every keystore save in this block fails for real: the kernel refuses to
    grow any file of this process beyond :data:`SAVE_FAILS_BEYOND` bytes
    (RLIMIT_FSIZE: ``OSError`` EFBIG, "File too large", with SIGXFSZ ignored),
    which the tests can do as root too (permission bits do not stop root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (SAVE_FAILS_BEYOND, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def keyed_app(tmp_path: Any, ui: Any, user_id: int = 1001, peer: int = 2002) -> Any:
    """A ClientApp for ``user_id`` with pair keys with ``peer`` (no server), its
    keystore in ``tmp_path``, printing through ``ui`` (a LineUI), attached to it."""
    from twisted.internet.task import Clock

    from enclaves.client.app import ClientApp
    from enclaves.client.keystore import Keystore

    core, other = make_core(user_id), make_core(peer)
    relay = Relay(core, other)
    relay.post(user_id, core.start_kex(peer, 0.0))
    relay.flush(0.0)
    keystore = Keystore.create(tmp_path / "ks", "pass phrase", core.state())
    clock = Clock()
    clock.advance(1000)
    app = ClientApp(clock, keystore, core.state(), "tcp:127.0.0.1:1", ui.line, core=core)
    ui.attach(app)
    return app
