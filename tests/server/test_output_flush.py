"""When the server's queued output leaves: at the end of the read that queued it.

Within one read, what goes to one session is sealed together (one frame where
it fits); no timed call is needed for it, so a routing turn costs no
``callLater`` and no trip through the reactor's heap of timed calls.
"""

from __future__ import annotations

import struct

from enclaves.frames import FrameType
from enclaves.inner import Accepted, Deliver, Delivered, InnerMessage, Received, Send
from tests.server.harness import Harness, RawClient

A, B, C = 11, 22, 33


def mid(n: int) -> bytes:
    return struct.pack(">16xQ", n)[-16:]


def written(client: RawClient) -> list[list[InnerMessage]]:
    """The frames the server has written to ``client`` so far, opened, without
    letting the clock (and so any timed call) run."""
    assert client.session is not None
    data = client.transport.value()
    client.transport.clear()
    frames = client.decoder.feed(data)
    assert all(f.type is FrameType.SEALED for f in frames)
    return [client.session.open(f.payload) for f in frames]


def timed_calls_due_now(h: Harness) -> list[object]:
    now = h.clock.seconds()
    return [c for c in h.clock.getDelayedCalls() if c.getTime() <= now]


def logged_in(h: Harness, *users: int) -> list[RawClient]:
    clients = [h.raw(u, h.add_user(u)) for u in users]
    for client in clients:
        client.login()
    return clients


def test_a_routing_turn_leaves_within_its_reads_in_one_frame_each_way() -> None:
    h = Harness()
    a, b = logged_in(h, A, B)
    a.send(Send(mid(1), B, b"one"), Send(mid(2), B, b"two"))
    # Before any reactor turn: the DELIVERs are out, in one frame.
    assert written(b) == [[Deliver(mid(1), A, b"one"), Deliver(mid(2), A, b"two")]]
    assert written(a) == []
    assert timed_calls_due_now(h) == []
    b.send(Received(mid(1)), Received(mid(2)))
    assert written(a) == [
        [Accepted(mid(1)), Delivered(mid(1)), Accepted(mid(2)), Delivered(mid(2))]
    ]
    assert timed_calls_due_now(h) == []


def test_one_frame_to_several_recipients_is_one_frame_to_each() -> None:
    h = Harness()
    a, b, c = logged_in(h, A, B, C)
    a.send(Send(mid(1), B, b"b1"), Send(mid(2), C, b"c1"), Send(mid(3), B, b"b2"))
    assert written(b) == [[Deliver(mid(1), A, b"b1"), Deliver(mid(3), A, b"b2")]]
    assert written(c) == [[Deliver(mid(2), A, b"c1")]]
    # Receipts for one sender from two readers' frames: one frame per read.
    b.send(Received(mid(1)), Received(mid(3)))
    c.send(Received(mid(2)))
    assert written(a) == [
        [Accepted(mid(1)), Delivered(mid(1)), Accepted(mid(3)), Delivered(mid(3))],
        [Accepted(mid(2)), Delivered(mid(2))],
    ]


def test_the_readers_own_answers_and_routed_output_leave_together() -> None:
    """A frame that both answers its sender (an ERROR for a bad recipient)
    and routes to another: both written when the read ends."""
    h = Harness()
    a, b = logged_in(h, A, B)
    a.send(Send(mid(1), 0, b"nobody"), Send(mid(2), B, b"hi"))
    (answer,) = written(a)
    assert [type(m).__name__ for m in answer] == ["Error"]
    assert written(b) == [[Deliver(mid(2), A, b"hi")]]
