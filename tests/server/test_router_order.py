"""Arrival order holds while stores are still in flight (found by bench/load.py).

A recipient that logs in while messages for it are still being written must
get them before anything sent later: its client's 64-wide replay window
drops an e2e MESSAGE more than 64 counters behind the newest it has seen,
so a reordering wider than that loses an ACCEPTED message for good.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred

from enclaves.inner import Accepted, Deliver, Directory, Received, Send
from enclaves.storage.memory import MemoryStorage
from tests.server.harness import Harness

A, B, C = 11, 22, 33


def mid(n: int) -> bytes:
    return struct.pack(">QQ", 0, n)


class HeldStores(MemoryStorage):
    """Stores complete (become durable and visible) only on :meth:`release`, in order."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.holding = False
        self._held: list[tuple[tuple[int, int, bytes, bytes], Deferred[int]]] = []

    def store_message(self, recipient: int, sender: int, msg_id: bytes, blob: bytes) -> Any:
        if not self.holding:
            return super().store_message(recipient, sender, msg_id, blob)
        d: Deferred[int] = Deferred()
        self._held.append(((recipient, sender, msg_id, blob), d))
        return d

    def release(self, count: int | None = None) -> None:
        held, self._held = self._held[:count], self._held[len(self._held[:count]) :]
        for args, d in held:
            super().store_message(*args).chainDeferred(d)


def harness(**router: Any) -> tuple[Harness, HeldStores]:
    h = Harness(router=router)
    storage = HeldStores(max_pending_count=50, max_pending_bytes=100_000)
    h.storage = storage
    h.router.storage = storage
    h.factory.storage = storage
    return h, storage


def delivered(client: Any) -> list[bytes]:
    return [m.msg_id for m in client.received() if isinstance(m, Deliver)]


def test_login_during_stores_keeps_arrival_order() -> None:
    h, storage = harness()
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    storage.holding = True
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(3)))  # B offline: being stored
    b = h.raw(B, kb)
    assert b.login() == [Directory((A, B))]  # nothing on disk yet
    a.send(Send(mid(3), B, b"3"), Send(mid(4), B, b"4"))  # live, but must wait behind 0..2
    assert delivered(b) == []
    storage.release(2)
    assert delivered(b) == []  # 2 is still being written
    storage.release()
    assert delivered(b) == [mid(i) for i in range(5)]
    assert a.received() == [Accepted(mid(i)) for i in range(3)]  # the stored ones
    b.send(*(Received(mid(i)) for i in range(5)))
    b.received()
    assert Accepted(mid(4)) in a.received()
    assert storage.pending_for(B).result == []
    # Nothing in flight any more: live delivery again.
    storage.holding = False
    a.send(Send(mid(5), B, b"5"))
    assert delivered(b) == [mid(5)]


def test_stores_done_before_the_session_is_ready_keep_order() -> None:
    h, storage = harness()
    ka, kb, kc = h.add_user(A), h.add_user(B), h.add_user(C)
    a, c = h.raw(A, ka), h.raw(C, kc)
    a.login(), c.login()
    storage.holding = True
    a.send(Send(mid(1), B, b"1"))
    b = h.raw(B, kb)
    b.login()
    c.send(Send(mid(2), B, b"2"))
    storage.release()
    assert delivered(b) == [mid(1), mid(2)]


def test_recipient_reconnects_while_its_in_flight_messages_are_stored() -> None:
    h, storage = harness(max_inflight=4)
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(4)))
    assert delivered(b) == [mid(i) for i in range(4)]
    storage.holding = True
    b.lose()  # 0..3 go to storage, slowly
    b2 = h.raw(B, kb)
    b2.login()
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(4, 8)))
    storage.holding = False
    storage.release()
    got = delivered(b2)
    for _ in range(10):
        if len(got) >= 8:
            break
        b2.send(*(Received(m) for m in got[-4:]))
        got += delivered(b2)
    assert got == [mid(i) for i in range(8)]
