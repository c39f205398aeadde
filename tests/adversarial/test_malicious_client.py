"""An authenticated but malicious client: it holds valid session keys and seals anything.

Run against the real server protocol and router over StringTransport with
MemoryStorage and a task.Clock (tests/server/harness.py), so hypothesis can
try thousands of cases.  What must hold: whatever the client seals, the
server raises nothing and logs no failure; a malformed frame is refused whole
(nothing in it is acted on) and ends only that session; other users' traffic
goes on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from enclaves.frames import ErrorCode
from enclaves.inner import (
    NO_MSG_ID,
    Accepted,
    Deliver,
    Delivered,
    Directory,
    Error,
    InnerMessage,
    Invite,
    InviteToken,
    Joined,
    Ping,
    Pong,
    Received,
    Removed,
    Rotate,
    Rotated,
    Send,
    encode,
)
from tests.server.harness import Harness, RawClient

A, B, C = 11, 22, 33
ENDS_SESSION = {ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_KIND}


@contextmanager
def no_failures_logged() -> Iterator[list[LogEvent]]:
    """Collect log events; fail if any carries a failure (a traceback)."""
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)
    failures = [e for e in events if "log_failure" in e]
    assert not failures, [e["log_failure"].getTraceback() for e in failures]


def setup() -> tuple[Harness, RawClient, RawClient, RawClient]:
    h = Harness(router={"allow_invites": True})
    keys = {uid: h.add_user(uid) for uid in (A, B, C)}
    clients = []
    for uid in (A, B, C):
        client = h.raw(uid, keys[uid])
        client.login()
        clients.append(client)
    a, b, c = clients
    return h, a, b, c


def codes(messages: list[InnerMessage]) -> list[int]:
    return [m.code for m in messages if isinstance(m, Error)]


def still_routes(c: RawClient, b: RawClient, n: int) -> None:
    """C, an honest bystander, still gets a message through to B and hears DELIVERED."""
    msg_id = struct.pack(">QQ", 0xC0FFEE, n)
    c.send(Send(msg_id, B, b"bystander"))
    assert Deliver(msg_id, C, b"bystander") in b.received()
    b.send(Received(msg_id))
    assert Delivered(msg_id) in c.received()


def test_every_bit_of_every_inner_length_field() -> None:
    """The client corrupts each bit of each inner ``u32 length`` of a frame holding a
    SEND to B and a PING.  The frame is refused whole: no DELIVER reaches B, the
    session ends with BAD_MESSAGE or UNKNOWN_KIND, and C still reaches B."""
    plain = encode(Send(b"s" * 16, B, b"hello B")) + encode(Ping(7))
    starts = [0, len(encode(Send(b"s" * 16, B, b"hello B")))]
    outcomes = set()
    with no_failures_logged():
        for start in starts:
            for bit in range(32):
                _h, a, b, c = setup()
                b.received(), c.received()
                bad = bytearray(plain)
                bad[start + bit // 8] ^= 0x80 >> (bit % 8)
                a.write(a.session.seal_frame(bytes(bad)))  # type: ignore[union-attr]
                answer = codes(a.received())
                assert len(answer) == 1 and answer[0] in ENDS_SESSION, (start, bit, answer)
                assert a.closing
                outcomes.add(answer[0])
                assert not [m for m in b.received() if isinstance(m, Deliver)]
                a.lose()
                still_routes(c, b, bit)
    assert outcomes <= ENDS_SESSION


IDS = st.sampled_from([0, A, B, C, 999, 2**64 - 1])
MSG_IDS = st.sampled_from([NO_MSG_ID, b"a" * 16, b"b" * 16]) | st.binary(min_size=16, max_size=16)
BLOBS = st.binary(max_size=64)
KEYS = st.binary(min_size=32, max_size=32)
INNER = st.one_of(
    st.builds(Send, MSG_IDS, IDS, BLOBS),
    st.builds(Received, MSG_IDS),
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.builds(Pong, st.integers(0, 2**64 - 1)),
    st.builds(Error, st.integers(0, 65535), MSG_IDS, st.text(max_size=20)),
    st.builds(Invite),
    st.builds(lambda e, a: Rotate(e, a) if e != a else Ping(0), KEYS, KEYS),
    # Server-to-client kinds a client may not send:
    st.builds(Deliver, MSG_IDS, IDS.filter(bool), BLOBS),
    st.builds(Accepted, MSG_IDS),
    st.builds(Delivered, MSG_IDS),
    st.builds(Rotated),
    st.builds(lambda: Directory((A, B))),
    st.builds(Joined, IDS.filter(bool)),
    st.builds(Removed, IDS.filter(bool)),
    st.builds(lambda: InviteToken(A, 0, "x")),
)
RAW_INNER = st.builds(
    lambda kind, body: struct.pack(">IB", len(body) + 1, kind) + body,
    st.integers(0, 255),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(INNER, min_size=1, max_size=6), min_size=1, max_size=4), RAW_INNER)
def test_any_sequence_of_inner_messages(frames: list[list[InnerMessage]], raw: bytes) -> None:
    """A logged-in client seals any sequence of inner messages (server-only kinds,
    user 0, unknown and huge ids, repeated msg_ids, RECEIVED for nothing, ROTATE,
    INVITE, ERROR), then one raw inner message of any kind byte.  The server
    answers or ends the session, never raises, never logs a failure; C reaches B."""
    with no_failures_logged():
        h, a, b, c = setup()
        b.received(), c.received()
        for messages in [*frames, None]:
            if a.closing:
                break
            if messages is None:
                a.write(a.session.seal_frame(raw))  # type: ignore[union-attr]
            else:
                a.send(*messages)
            h.clock.advance(0)
            a.received()
        a.lose()
        for message in b.received():
            if isinstance(message, Deliver):
                b.send(Received(message.msg_id))
        c.received()
        still_routes(c, b, 0)
        assert h.router.stats().connections == 2
