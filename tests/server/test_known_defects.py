"""Known defects of the router, not fixed yet (docs/development.rst).

Each test states what should hold; ``xfail(strict=True)`` makes the suite
fail the day a fix makes it pass, until the marker goes.
"""

from __future__ import annotations

import struct

import pytest

from enclaves.inner import Deliver, Directory, Send
from tests.server.harness import Harness

A, C = 11, 33


def mid(n: int) -> bytes:
    return struct.pack(">QQ", 1, n)


@pytest.mark.xfail(
    strict=True,
    reason="messages in flight when the connection drops are stored behind the "
    "ones that had spilled to storage while the window was full, so the next "
    "login gets them out of order (found by test_routing_model.py)",
)
def test_messages_in_flight_when_the_connection_drops_keep_their_order() -> None:
    """Window of 4: messages 0-3 go out live, 4 spills to storage.  The
    recipient's connection drops before it acknowledges any: 0-3 are stored
    then, after 4.  Its next login must still get 0, 1, 2, 3, 4 — the
    reference client's replay window drops a message more than 64 behind
    the newest it has seen, so with the default window of 1,000 such a
    reordering loses messages for good."""
    h = Harness(router={"max_inflight": 4})
    ka, kc = h.add_user(A), h.add_user(C)
    a, c = h.raw(A, ka), h.raw(C, kc)
    a.login(), c.login()
    a.send(*(Send(mid(i), C, b"m%d" % i) for i in range(5)))
    assert [m.msg_id for m in c.received()] == [mid(i) for i in range(4)]
    c.lose()
    again = h.raw(C, kc)
    got = [m for m in again.login() if not isinstance(m, Directory)]
    assert got == [Deliver(mid(i), A, b"m%d" % i) for i in range(4)], got
