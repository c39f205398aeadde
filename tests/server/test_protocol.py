"""Server protocol and router over StringTransport with task.Clock: every path."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode, FrameType, encode_frame
from enclaves.handshake import AUTH_FAILED_TEXT
from enclaves.inner import (
    NO_MSG_ID,
    Accepted,
    Deliver,
    Delivered,
    Directory,
    Error,
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
)
from enclaves.server.router import REVOKED_UNREAD
from enclaves.session import max_blob_size
from enclaves.storage.interface import StorageError, UnknownUser
from enclaves.storage.memory import MemoryStorage
from enclaves.token import parse_token
from tests.server.harness import NOW, Harness

A, B, C = 11, 22, 33


def mid(n: int) -> bytes:
    return struct.pack(">16xQ", n)[-16:]


def _result(d: Deferred) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out
    return out[0]


def _pending(h: Harness, user: int) -> list[bytes]:
    return [m.msg_id for m in _result(h.storage.pending_for(user))]  # type: ignore[union-attr]


def _codes(messages: list) -> list[int]:
    return [m.code for m in messages if isinstance(m, Error)]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_login_sends_directory_then_online_delivery(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    assert a.login() == [Directory((A, B))]
    assert b.login() == [Directory((A, B))]
    assert h.router.is_online(A) and h.router.is_online(B)
    a.send(Send(mid(1), B, b"blob-1"), Send(mid(2), B, b"blob-2"))
    assert a.received() == []  # no ACCEPTED before RECEIVED
    assert b.received() == [Deliver(mid(1), A, b"blob-1"), Deliver(mid(2), A, b"blob-2")]
    assert _pending(h, B) == []
    b.send(Received(mid(2)), Received(mid(1)))
    assert a.received() == [
        Accepted(mid(2)),
        Delivered(mid(2)),
        Accepted(mid(1)),
        Delivered(mid(1)),
    ]
    stats = h.router.stats()
    assert (stats.connections, stats.sessions, stats.messages_routed) == (2, 2, 2)
    assert stats.messages_delivered == 2 and stats.started_at == NOW and stats.uptime == 0


def test_offline_delivery_in_order_then_delete(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    a.send(*(Send(mid(i), B, b"x%d" % i) for i in range(5)))
    assert a.received() == [Accepted(mid(i)) for i in range(5)]
    assert _pending(h, B) == [mid(i) for i in range(5)]
    b = h.raw(B, kb)
    assert b.login() == [Directory((A, B))] + [Deliver(mid(i), A, b"x%d" % i) for i in range(5)]
    b.send(*(Received(mid(i)) for i in range(5)))
    assert a.received() == [Delivered(mid(i)) for i in range(5)]
    assert _pending(h, B) == []
    assert h.router.stats().messages_stored == 5


def test_recipient_gone_before_received_stores_in_flight(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(Send(mid(7), B, b"in flight"))
    assert b.received() == [Deliver(mid(7), A, b"in flight")]
    b.lose()
    assert not h.router.is_online(B)
    assert a.received() == [Accepted(mid(7))]
    assert _pending(h, B) == [mid(7)]
    b2 = h.raw(B, kb)
    assert b2.login()[1:] == [Deliver(mid(7), A, b"in flight")]


def test_sender_resend_while_in_flight_is_delivered_and_answered_once(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(Send(mid(1), B, b"m"))
    a.send(Send(mid(1), B, b"m"))
    assert b.received() == [Deliver(mid(1), A, b"m")]
    b.send(Received(mid(1)))
    assert a.received() == [Accepted(mid(1)), Delivered(mid(1))]


def test_storage_failure_quota_unknown_and_too_large(h: Harness) -> None:
    ka, _kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    h.storage.fail_writes = True
    a.send(Send(mid(1), B, b"m"))
    h.storage.fail_writes = False
    a.send(Send(mid(2), 999, b"m"), Send(mid(3), 0, b"m"))
    assert [(m.code, m.msg_id) for m in a.received()] == [
        (ErrorCode.STORAGE_FAILED, mid(1)),
        (ErrorCode.UNKNOWN_RECIPIENT, mid(2)),
        (ErrorCode.UNKNOWN_RECIPIENT, mid(3)),
    ]
    assert h.router.max_blob == max_blob_size(65536)
    for i in range(50):
        a.send(Send(mid(100 + i), B, b"q"))
    a.received()
    a.send(Send(mid(999), B, b"q"))
    assert [(m.code, m.msg_id) for m in a.received()] == [(ErrorCode.QUOTA_EXCEEDED, mid(999))]
    assert not a.closing


def test_too_large_for_storage_is_refused() -> None:
    h = Harness()
    h.storage.max_pending_bytes = 1000
    h.router = type(h.router)(h.storage, h.clock)
    h.factory.router = h.router
    ka, _ = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    a.send(Send(mid(1), B, bytes(1001)))
    assert _codes(a.received()) == [ErrorCode.MESSAGE_TOO_LARGE]


def test_unknown_user_and_bad_tag_look_the_same(h: Harness) -> None:
    h.add_user(A)
    unknown = h.raw(B, KeyPair.generate())
    unknown.write(unknown.handshake.hello_frame())
    bad_tag = h.raw(A, KeyPair.generate())
    bad_tag.write(bad_tag.handshake.hello_frame())
    first, second = unknown.transport.value(), bad_tag.transport.value()
    assert first == second
    assert unknown.outer_error() == (ErrorCode.AUTH_FAILED, AUTH_FAILED_TEXT)


def test_failed_handshakes_back_off_per_source(h: Harness) -> None:
    ka = h.add_user(A)
    for _ in range(6):
        bad = h.raw(A, KeyPair.generate(), host="198.51.100.7")
        bad.write(bad.handshake.hello_frame())
        assert bad.outer_error()[0] == ErrorCode.AUTH_FAILED
        bad.lose()
    blocked = h.raw(A, ka, host="198.51.100.7")
    code, text = blocked.outer_error()
    assert code == ErrorCode.RATE_LIMITED and "retry" in text
    blocked.lose()
    # Another address, and the real user there, are not locked out.
    assert h.raw(A, ka, host="203.0.113.9").login() == [Directory((A,))]
    h.clock.advance(2)
    assert h.raw(A, ka, host="198.51.100.7").login() == [Directory((A,))]


def test_malformed_hello_and_unexpected_frames(h: Harness) -> None:
    c = h.raw(A, KeyPair.generate())
    c.write(encode_frame(FrameType.HELLO, b"short"))
    assert c.outer_error()[0] == ErrorCode.BAD_FRAME
    c = h.raw(A, KeyPair.generate())
    c.write(encode_frame(FrameType.SEALED, bytes(40)))
    assert c.outer_error()[0] == ErrorCode.BAD_FRAME
    c = h.raw(A, KeyPair.generate())
    c.write(b"\x00\x00\x00\x02\x07\x01")
    assert c.outer_error()[0] == ErrorCode.BAD_FRAME


def test_oversize_frame(h: Harness) -> None:
    c = h.raw(A, KeyPair.generate())
    c.write(struct.pack(">I", 65537))
    assert c.outer_error()[0] == ErrorCode.FRAME_TOO_LARGE
    ka = h.add_user(A)
    c = h.raw(A, ka)
    c.login()
    c.write(struct.pack(">I", 1 << 30))
    assert _codes(c.received()) == [ErrorCode.FRAME_TOO_LARGE]
    assert c.closing


def _session_pair(h: Harness):  # type: ignore[no-untyped-def]
    ka = h.add_user(A)
    a = h.raw(A, ka)
    a.login()
    return a


def test_replayed_frame_ends_the_session(h: Harness) -> None:
    a = _session_pair(h)
    frame = a.session.seal([Ping(1)])  # type: ignore[union-attr]
    a.write(frame)
    assert a.received() == [Pong(1)]
    a.write(frame)
    assert _codes(a.received()) == [ErrorCode.BAD_SESSION_FRAME]
    assert a.closing
    a.lose()
    assert not h.router.is_online(A)


def test_reordered_frame_ends_the_session(h: Harness) -> None:
    a = _session_pair(h)
    first = a.session.seal([Ping(1)])  # type: ignore[union-attr]
    second = a.session.seal([Ping(2)])  # type: ignore[union-attr]
    a.write(second + first)
    assert _codes(a.received()) == [ErrorCode.BAD_SESSION_FRAME]
    assert a.closing


def test_forged_frame_ends_the_session(h: Harness) -> None:
    a = _session_pair(h)
    frame = bytearray(a.session.seal([Ping(1)]))  # type: ignore[union-attr]
    frame[20] ^= 0x40
    a.write(bytes(frame))
    assert _codes(a.received()) == [ErrorCode.BAD_SESSION_FRAME]
    assert a.closing


def test_unknown_kind_and_client_only_kinds(h: Harness) -> None:
    a = _session_pair(h)
    a.write(a.session.seal_frame(struct.pack(">IB", 1, 0x55)))  # type: ignore[union-attr]
    assert _codes(a.received()) == [ErrorCode.UNKNOWN_KIND]
    assert a.closing
    h2 = Harness()
    a = _session_pair(h2)
    a.send(Accepted(mid(1)))
    assert _codes(a.received()) == [ErrorCode.BAD_MESSAGE]


def test_handshake_timeout() -> None:
    h = Harness(handshake_timeout=5)
    c = h.raw(A, KeyPair.generate())
    h.clock.advance(4.9)
    assert not c.closing
    h.clock.advance(0.2)
    assert c.outer_error()[0] == ErrorCode.HANDSHAKE_TIMEOUT


def test_idle_timeout_and_keepalive() -> None:
    h = Harness(idle_timeout=60)
    a = _session_pair(h)
    h.clock.advance(30)
    (ping,) = a.received()
    assert isinstance(ping, Ping)
    a.send(Pong(ping.nonce))
    h.clock.advance(29)
    assert a.received() == [] and not a.closing
    h.clock.advance(1)
    (ping,) = a.received()
    h.clock.advance(30)
    assert _codes(a.received()) == [ErrorCode.IDLE_TIMEOUT]
    assert a.closing


def test_max_connections() -> None:
    h = Harness(max_connections=1)
    h.raw(A, KeyPair.generate())
    second = h.raw(A, KeyPair.generate())
    assert second.outer_error()[0] == ErrorCode.SERVER_BUSY
    second.lose()
    assert h.router.stats().connections == 1


def test_message_rate() -> None:
    h = Harness(router={"message_rate": 5})
    ka, _ = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    a.send(*(Send(mid(i), B, b"m") for i in range(5)))
    assert len(a.received()) == 5
    h.clock.advance(1)
    a.send(*(Send(mid(i), B, b"m") for i in range(10, 18)))
    assert _codes(a.received()) == [ErrorCode.MESSAGE_RATE]
    assert a.closing
    # Within the frame, the SENDs before the one over the rate were routed;
    # none after it.
    stored = [mid(i) for i in range(5)] + [mid(i) for i in range(10, 15)]
    assert _pending(h, B) == stored


def test_enrollment_rotation_and_token_reuse() -> None:
    h = Harness()
    ka = h.add_user(A)
    token_keys = h.add_user(C, enrolling_for=3600)
    a = h.raw(A, ka)
    assert a.login() == [Directory((A,))]  # a token not yet used is not listed
    c = h.raw(C, token_keys)
    assert c.login() == []  # nothing until ROTATE
    c.send(Send(mid(1), A, b"m"), Invite(), Ping(3))
    assert [(m.code, m.msg_id) for m in c.received() if isinstance(m, Error)] == [
        (ErrorCode.ENROLLMENT_REQUIRED, mid(1)),
        (ErrorCode.ENROLLMENT_REQUIRED, NO_MSG_ID),
    ]
    # A message for the enrolling user is stored, not pushed.
    a.send(Send(mid(9), C, b"welcome"))
    assert a.received() == [Accepted(mid(9))]
    new = KeyPair.generate()
    c.send(Rotate(new.enc, new.auth))
    assert c.received() == [Rotated(), Directory((A, C)), Deliver(mid(9), A, b"welcome")]
    assert a.received() == [Joined(C)]
    record = _result(h.storage.load_user(C))
    assert record.keys == new and not record.enrolling  # type: ignore[union-attr]
    # The token's keys are dead; the new ones work, and replace the old session.
    again = h.raw(C, token_keys)
    again.write(again.handshake.hello_frame())
    assert again.outer_error()[0] == ErrorCode.AUTH_FAILED
    c2 = h.raw(C, new)
    assert c2.login() == [Directory((A, C)), Deliver(mid(9), A, b"welcome")]
    assert _codes(c.received()) == [ErrorCode.REPLACED]
    # A later rotation by an enrolled user.
    newer = KeyPair.generate()
    c2.send(Rotate(newer.enc, newer.auth))
    assert c2.received() == [Rotated(), Directory((A, C))]


def test_rotation_of_enrolled_user_answers_rotated_and_directory(h: Harness) -> None:
    a = _session_pair(h)
    new = KeyPair.generate()
    a.send(Rotate(new.enc, new.auth))
    assert a.received() == [Rotated(), Directory((A,))]
    h.storage.fail_writes = True
    a.send(Rotate(new.auth, new.enc))
    assert _codes(a.received()) == [ErrorCode.STORAGE_FAILED]


def test_expired_token_refused_at_login() -> None:
    h = Harness()
    keys = h.add_user(C, enrolling_for=-1)
    c = h.raw(C, keys)
    c.write(c.handshake.hello_frame())
    code, text = c.outer_error()
    assert code == ErrorCode.TOKEN_EXPIRED and "expired" in text


def test_invites_off_and_on() -> None:
    h = Harness()
    a = h.raw(A, h.add_user(A))
    a.login()
    a.send(Invite())
    assert _codes(a.received()) == [ErrorCode.INVITES_DISABLED]
    assert not a.closing
    h = Harness(router={"allow_invites": True, "token_lifetime": 600})
    a = h.raw(A, h.add_user(A))
    a.login()
    a.send(Invite())
    (invite,) = a.received()
    assert isinstance(invite, InviteToken)
    assert invite.expires_ms == int(NOW * 1000) + 600_000
    token = parse_token(invite.token)
    assert token.user_id == invite.user_id
    record = _result(h.storage.load_user(token.user_id))
    assert record.enrolling and record.keys == token.keys  # type: ignore[union-attr]
    assert h.raw(token.user_id, token.keys).login() == []


def test_revoke(h: Harness) -> None:
    ka, kb, kc = h.add_user(A), h.add_user(B), h.add_user(C)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(Send(mid(1), C, b"stored"))
    a.send(Send(mid(2), B, b"in flight"))
    assert a.received() == [Accepted(mid(1))]
    b.received()
    assert _result(h.router.revoke(C)) == 1
    # The accepted message was deleted unread: its sender is told.
    assert a.received() == [Removed(C), Error(ErrorCode.UNKNOWN_RECIPIENT, mid(1), REVOKED_UNREAD)]
    assert b.received() == [Removed(C)]
    assert _pending(h, C) == []
    gone = h.raw(C, kc)
    gone.write(gone.handshake.hello_frame())
    assert gone.outer_error()[0] == ErrorCode.AUTH_FAILED
    count = _result(h.router.revoke(B))
    assert count == 0
    assert _codes(b.received()) == [ErrorCode.REVOKED]
    assert b.closing and not h.router.is_online(B)
    assert a.received() == [
        Error(ErrorCode.UNKNOWN_RECIPIENT, mid(2), "the recipient was revoked"),
        Removed(B),
    ]
    failure = _result(h.router.revoke(B))
    assert failure.check(UnknownUser)  # type: ignore[union-attr]
    b.lose()


def test_revoke_counts_pending(h: Harness) -> None:
    ka, _ = h.add_user(A), h.add_user(C)
    a = h.raw(A, ka)
    a.login()
    a.send(Send(mid(1), C, b"1"), Send(mid(2), C, b"2"))
    a.received()
    assert _result(h.router.revoke(C)) == 2


def test_replace_moves_in_flight_to_the_new_session(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(Send(mid(1), B, b"m"))
    assert b.received() == [Deliver(mid(1), A, b"m")]
    b2 = h.raw(B, kb)
    assert b2.login() == [Directory((A, B)), Deliver(mid(1), A, b"m")]
    assert _codes(b.received()) == [ErrorCode.REPLACED]
    b.lose()
    assert h.router.is_online(B)
    assert a.received() == [Accepted(mid(1))]
    b2.send(Received(mid(1)))
    assert a.received() == [Delivered(mid(1))]
    assert _pending(h, B) == []


def test_shutdown_stores_in_flight_and_says_why(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(Send(mid(1), B, b"m"))
    b.received()
    handshaking = h.raw(C, KeyPair.generate())
    h.factory.disconnect_all()
    assert handshaking.outer_error()[0] == ErrorCode.SHUTTING_DOWN
    assert _codes(b.received()) == [ErrorCode.SHUTTING_DOWN]
    assert _pending(h, B) == [mid(1)]


def test_client_error_frame_closes_quietly(h: Harness) -> None:
    a = _session_pair(h)
    a.write(encode_frame(FrameType.ERROR, b"\x00\x01bye"))
    assert a.closing


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=120), max_size=6))
def test_random_bytes_before_a_session_never_crash(chunks: list[bytes]) -> None:
    h = Harness()
    c = h.raw(A, KeyPair.generate())
    for chunk in chunks:
        c.write(chunk)
    for frame in c.frames():
        assert frame.type is FrameType.ERROR
    c.lose()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300))
def test_random_sealed_payloads_end_the_session_cleanly(payload: bytes) -> None:
    h = Harness()
    a = _session_pair(h)
    a.write(encode_frame(FrameType.SEALED, payload))
    assert _codes(a.received()) == [ErrorCode.BAD_SESSION_FRAME]
    assert a.closing
    a.lose()
    assert not h.router.is_online(A) and h.router.stats().connections == 0


def test_stats_uptime_and_counters(h: Harness) -> None:
    ka, _ = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    a.send(Send(mid(1), B, b"stored"))
    a.received()
    h.clock.advance(5)
    stats = h.router.stats()
    assert stats.uptime == 5 and stats.taken_at == NOW + 5
    assert (stats.connections, stats.sessions) == (1, 1)
    assert (stats.messages_routed, stats.messages_stored, stats.messages_delivered) == (1, 1, 0)
    a.lose()
    assert h.router.stats().connections == 0 and h.router.stats().sessions == 0


def test_slow_recipient_window_spills_to_storage_in_order() -> None:
    h = Harness(router={"max_inflight": 4})
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(10)))
    first = b.received()
    assert [d.msg_id for d in first] == [mid(i) for i in range(4)]
    # The six beyond the window are stored, and so are the four out to B when
    # the window filled (ahead of them, should B's connection drop): all ten
    # ACCEPTED at once, in order.
    assert a.received() == [Accepted(mid(i)) for i in range(10)]
    assert _pending(h, B) == [mid(i) for i in range(10)]
    a.send(Send(mid(10), B, b"10"))  # later live traffic queues behind them
    assert a.received() == [Accepted(mid(10))]
    delivered = [d.msg_id for d in first]
    for _ in range(20):
        if len(delivered) == 11:
            break
        b.send(*(Received(m) for m in delivered[-4:]))
        delivered += [d.msg_id for d in b.received() if isinstance(d, Deliver)]
    assert delivered == [mid(i) for i in range(11)]
    b.send(*(Received(m) for m in delivered[-4:]))
    b.received()
    assert _pending(h, B) == []
    assert len(h.router._online[B].inflight) == 0


class _Held:
    """Storage calls held until :meth:`release`, then made and answered in the
    order asked: as with FileStorage, a store takes effect (its message listed
    by ``pending_for``) when it answers, not before."""

    def __init__(self, h: Harness, *names: str) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred]] = []
        for name in names:
            real = getattr(h.storage, name)

            def held(*args: Any, real: Any = real) -> Deferred:
                out: Deferred = Deferred()
                self.calls.append((real, args, out))
                return out

            setattr(h.storage, name, held)

    def release(self) -> None:
        while self.calls:
            real, args, out = self.calls.pop(0)
            real(*args).chainDeferred(out)


@pytest.mark.parametrize("acks", [1, 4])  # a window of 4: no refill until 2 are out
@pytest.mark.parametrize(
    "held",
    [(), ("pending_for",), ("store_message",), ("pending_for", "store_message", "remove_message")],
)
def test_live_sends_while_a_spilled_window_drains_keep_their_order(
    held: tuple[str, ...], acks: int
) -> None:
    """After a window spilled, new SENDs to its recipient wait behind the
    stored ones while the window drains: sent between acknowledgements (of
    one message, or of the window), while its refill reads storage or copies
    are still being written, every message reaches B once, in the order A
    sent them, and A hears DELIVERED for each."""
    h = Harness(router={"max_inflight": 4})
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    storage = _Held(h, *held)
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(8)))  # the window fills and spills
    sent, delivered, told = 8, [], set()
    unacked: list[bytes] = []
    for _ in range(100):
        new = [m.msg_id for m in b.received() if isinstance(m, Deliver)]
        delivered += new
        unacked += new
        if len(delivered) == sent == 20:
            break
        if sent < 20:
            a.send(Send(mid(sent), B, b"%d" % sent))  # before the acknowledgement is read
            sent += 1
        b.send(*(Received(m) for m in unacked[:acks]))
        del unacked[:acks]
        if sent < 20:
            a.send(Send(mid(sent), B, b"%d" % sent))  # after it, before storage answers
            sent += 1
        storage.release()
        told |= {m.msg_id for m in a.received() if isinstance(m, Delivered)}
    assert [int.from_bytes(m, "big") for m in delivered] == list(range(20))
    b.send(*(Received(m) for m in unacked))
    storage.release()
    told |= {m.msg_id for m in a.received() if isinstance(m, Delivered)}
    assert told == {mid(i) for i in range(20)}
    assert not _codes(a.received() + b.received())
    pending = _result(MemoryStorage.pending_for(h.storage, B))
    assert pending == [] and len(h.router._online[B].inflight) == 0


def test_two_senders_choosing_the_same_msg_id_each_reach_the_recipient(h: Harness) -> None:
    """msg_ids are the senders' own: two may collide (by chance, 2**-128; or
    on purpose, by a sender who learnt another's msg_id). RECEIVED names only
    the msg_id, so the second waits in storage until the first is
    acknowledged, then goes out, with what its sender sent after it behind
    it; each sender hears DELIVERED once its own message was received.
    (The second used to join the first as its "copy": never sent, and
    B's one RECEIVED told both senders DELIVERED.)"""
    ka, kb, kc = h.add_user(A), h.add_user(B), h.add_user(C)
    a, b, c = h.raw(A, ka), h.raw(B, kb), h.raw(C, kc)
    a.login(), b.login(), c.login()
    a.send(Send(mid(1), B, b"from a"))
    c.send(Send(mid(1), B, b"from c"), Send(mid(2), B, b"then c"))
    assert b.received() == [Deliver(mid(1), A, b"from a")]
    assert c.received() == [Accepted(mid(1)), Accepted(mid(2))]  # stored
    b.send(Received(mid(1)))
    assert a.received() == [Accepted(mid(1)), Delivered(mid(1))]  # A's copy stored too
    assert b.received() == [Deliver(mid(1), C, b"from c"), Deliver(mid(2), C, b"then c")]
    assert c.received() == []
    b.send(Received(mid(1)), Received(mid(2)))
    assert c.received() == [Delivered(mid(1)), Delivered(mid(2))]
    assert a.received() == [] and not _codes(b.received())
    assert h.router._online[B].inflight == {} and _pending(h, B) == []


@pytest.mark.parametrize("removal", ["written", "refused"])
def test_a_copy_whose_removal_is_being_written_is_not_sent_again_at_the_next_login(
    removal: str,
) -> None:
    """B acknowledges a stored message and logs in again before the copy's
    removal is written: storage still lists the copy, and the new session is
    not sent it again (it was: thousands at once, after a fast reconnect, more
    than B's window).  A removal that storage refuses leaves the copy, and a
    later login delivers it again (the client drops the duplicate)."""
    h = Harness()
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    a.send(Send(mid(1), B, b"kept"))  # B is offline: stored
    assert a.received() == [Accepted(mid(1))]
    b = h.raw(B, kb)
    assert [m for m in b.login() + b.received() if isinstance(m, Deliver)] == [
        Deliver(mid(1), A, b"kept")
    ]
    held = _Held(h, "remove_message")
    b.send(Received(mid(1)))
    assert len(held.calls) == 1 and _pending(h, B) != []  # still listed
    b.lose()
    again = h.raw(B, kb)
    assert not [m for m in again.login() + again.received() if isinstance(m, Deliver)]
    if removal == "written":
        held.release()
        assert a.received() == [Delivered(mid(1))]
        assert _pending(h, B) == []
    else:
        (_real, _args, out) = held.calls.pop()
        out.errback(StorageError("the disk refused"))
        assert a.received() == [] and _pending(h, B) != []
    again.lose()
    last = h.raw(B, kb)
    redelivered = [m for m in last.login() + last.received() if isinstance(m, Deliver)]
    assert redelivered == ([] if removal == "written" else [Deliver(mid(1), A, b"kept")])


def test_a_refill_does_not_resend_a_copy_whose_removal_is_being_written() -> None:
    """The same for a refill's read: B's first session acknowledged message 0,
    and its removal is still being written while B's next session drains a
    spilled window (of 2): the refill lists it again, and skips it."""
    h = Harness(router={"max_inflight": 2})
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(5)))  # B is offline: stored
    b = h.raw(B, kb)
    first = [m.msg_id for m in b.login() + b.received() if isinstance(m, Deliver)]
    assert first == [mid(0), mid(1)]  # the window
    held = _Held(h, "remove_message")
    b.send(Received(mid(0)))
    b.lose()
    again = h.raw(B, kb)
    got = [m.msg_id for m in again.login() + again.received() if isinstance(m, Deliver)]
    assert got == [mid(1), mid(2)]  # not 0: its removal is in flight
    again.send(Received(mid(1)))  # the window drains: a refill reads storage
    got = [m.msg_id for m in again.received() if isinstance(m, Deliver)]
    assert got == [mid(3)] and len(held.calls) == 2  # 0 is listed, and skipped
    again.send(Received(mid(2)), Received(mid(3)))
    held.release()
    assert [m.msg_id for m in again.received() if isinstance(m, Deliver)] == [mid(4)]


def test_replayed_hello_never_replaces_the_live_session(h: Harness) -> None:
    """A recorded HELLO gets a WELCOME but no login: no REPLACED, nothing delivered."""
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login()
    b.login()
    hello = b.handshake.hello_frame()
    a.send(Send(mid(1), B, b"m"))
    assert b.received() == [Deliver(mid(1), A, b"m")]
    replayer = h.raw(B, kb, host="203.0.113.9")
    replayer.write(hello)
    assert [f.type for f in replayer.frames()] == [FrameType.WELCOME]
    assert b.received() == [] and not b.closing
    # Without the session keys its sealed frames do not open: dropped, still nobody replaced.
    replayer.write(encode_frame(FrameType.SEALED, bytes(8) + bytes(48)))
    # The answer is sealed under keys the replayer does not have.
    assert [f.type for f in replayer.frames()] == [FrameType.SEALED] and replayer.closing
    assert b.received() == [] and not b.closing and h.router.is_online(B)
    # A replayer that just waits hits the handshake timeout.
    quiet = h.raw(B, kb, host="203.0.113.9")
    quiet.write(hello)
    quiet.frames()
    h.clock.advance(h.factory.handshake_timeout + 1)
    assert [f.type for f in quiet.frames()] == [FrameType.SEALED] and quiet.closing
    assert b.received() == [] and h.router.is_online(B)


def test_errors_after_welcome_are_sealed(h: Harness) -> None:
    """Between WELCOME and the first SEALED frame the server already has session
    keys: an honest client gets an authenticated reason, not a forgeable one."""
    ka = h.add_user(A)
    slow = h.raw(A, ka)
    slow.welcome()
    h.clock.advance(h.factory.handshake_timeout + 1)
    assert _codes(slow.received()) == [ErrorCode.HANDSHAKE_TIMEOUT] and slow.closing
    confused = h.raw(A, ka)
    confused.welcome()
    confused.write(confused.handshake.hello_frame())
    assert _codes(confused.received()) == [ErrorCode.BAD_FRAME] and confused.closing
    assert not h.router.is_online(A)


def test_session_goes_live_on_the_first_sealed_frame(h: Harness) -> None:
    ka = h.add_user(A)
    a = h.raw(A, ka)
    a.welcome()
    assert not h.router.is_online(A) and a.received() == []
    a.send(Ping(7))
    assert a.received() == [Directory((A,)), Pong(7)]
    assert h.router.is_online(A)


def test_directory_larger_than_a_frame_comes_in_parts() -> None:
    h = Harness(router={"max_frame": 4096}, max_frame=4096)
    keys = {uid: h.add_user(uid) for uid in range(1, 1201)}
    a = h.raw(1, keys[1])
    parts = a.login()
    assert len(parts) == 3 and all(isinstance(p, Directory) for p in parts)
    assert [p.more for p in parts] == [True, True, False]  # type: ignore[union-attr]
    assert tuple(i for p in parts for i in p.user_ids) == tuple(range(1, 1201))  # type: ignore[union-attr]
    assert not a.closing


def test_output_that_fits_no_frame_closes_the_session_cleanly(h: Harness) -> None:
    a = _session_pair(h)
    a.proto.send(Deliver(mid(1), B, b"x" * 70_000))
    assert _codes(a.received()) == [ErrorCode.MESSAGE_TOO_LARGE]
    assert a.closing and not h.router.is_online(A)


def test_invites_are_limited_per_user_and_server_wide() -> None:
    h = Harness(
        router={"allow_invites": True, "max_enrollments": 7, "invites_per_hour": 5},
        idle_timeout=10**7,
    )
    a, b = h.raw(A, h.add_user(A)), h.raw(B, h.add_user(B))
    a.login(), b.login()
    for _ in range(6):
        a.send(Invite())
    got = a.received()
    assert [type(m) for m in got] == [InviteToken] * 5 + [Error]
    assert _codes(got) == [ErrorCode.RATE_LIMITED] and not a.closing
    h.clock.advance(3600 / 5)  # one more token an hour / 5 later
    a.send(Invite())
    assert [type(m) for m in a.received()] == [InviteToken]
    # 6 outstanding now; the server-wide cap of 7 stops B's second.
    b.send(Invite(), Invite())
    got = b.received()
    assert [type(m) for m in got] == [InviteToken, Error]
    assert _codes(got) == [ErrorCode.RATE_LIMITED]


def test_expired_unused_enrollments_are_purged() -> None:
    h = Harness(idle_timeout=10**7)
    ka = h.add_user(A)
    h.add_user(B, enrolling_for=60)  # expires in a minute
    h.add_user(C, enrolling_for=30 * 86400)  # still valid in a week
    a = h.raw(A, ka)
    a.login()
    assert _result(h.router.purge_expired_enrollments()) == []
    h.clock.advance(7 * 86400)
    assert _result(h.router.purge_expired_enrollments()) == []  # expired < 7 days ago
    h.clock.advance(120)
    assert _result(h.router.purge_expired_enrollments()) == [B]
    assert _result(h.storage.list_users()) == [A, C]
    assert a.received() == []  # B was never listed: nothing to take back


def test_nothing_after_a_closing_message_in_the_same_frame_is_routed() -> None:
    """A message that ends the session stops the rest of its sealed frame."""
    h = Harness()
    ka, _ = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.login()
    # DELIVER is server-only: BAD_MESSAGE ends the session; the SEND after it
    # in the same frame must not be routed (B is offline: it would be stored).
    a.send(Send(mid(1), B, b"before"), Deliver(mid(9), B, b"x"), Send(mid(2), B, b"after"), Ping(5))
    out = a.received()
    assert _codes(out) == [ErrorCode.BAD_MESSAGE]
    # The text names the kind as the spec does, not a class of the code.
    assert [m.text for m in out if isinstance(m, Error)] == ["a client may not send DELIVER"]
    assert Pong(5) not in out and Accepted(mid(2)) not in out
    assert a.closing
    assert _pending(h, B) == [mid(1)]


def test_every_session_end_is_logged_with_its_reason(h: Harness) -> None:
    """docs/admin.rst: the log has each closed session and why, a plain close too."""
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        a = h.raw(A, h.add_user(A))
        a.login()
        a.lose()
    finally:
        globalLogPublisher.removeObserver(events.append)
    ended = [formatEvent(e) for e in events if "ended" in e.get("log_format", "")]
    assert len(ended) == 1 and ended[0].startswith(f"session of user {A} ("), ended


def test_a_user_revoked_between_welcome_and_the_first_sealed_frame_does_not_go_live() -> None:
    """A connection past WELCOME when its user is revoked (its HELLO was
    checked against the keys just deleted) must not go live on its first
    SEALED frame with the stale record, nor SEND as the revoked user: it is
    closed REVOKED (found by the review of 2026-12-07)."""
    h = Harness()
    ka, _kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    a.welcome()
    _result(h.router.revoke(A))
    a.send(Ping(1), Send(mid(5), B, b"from a revoked user"))
    assert not h.router.is_online(A)
    pending = _result(h.storage.pending_for(B))
    assert pending == [], pending
    assert ErrorCode.REVOKED in _codes(a.received())


def test_a_login_with_the_token_past_welcome_does_not_go_live_after_the_rotation() -> None:
    """Someone else holding the token sends HELLO and waits after WELCOME;
    the newcomer rotates.  The old keys can never log in again: on its first
    SEALED frame that connection is closed AUTH_FAILED, and may not ROTATE
    (an account takeover) or replace the real session."""
    h = Harness()
    ka, token_keys = h.add_user(A), h.add_user(C, enrolling_for=3600)
    intruder = h.raw(C, token_keys)
    intruder.welcome()
    c = h.raw(C, token_keys)
    assert c.login() == []
    new = KeyPair.generate()
    c.send(Rotate(new.enc, new.auth))
    assert c.received()[0] == Rotated()
    theirs = KeyPair.generate()
    intruder.send(Ping(1), Rotate(theirs.enc, theirs.auth))
    assert _codes(intruder.received()) == [ErrorCode.AUTH_FAILED]
    assert intruder.closing
    assert _result(h.storage.load_user(C)).keys == new  # type: ignore[union-attr]
    assert h.router.is_online(C) and c.received() == [] and not c.closing
    del ka


def test_a_session_that_logged_in_with_old_keys_during_the_rotation_is_closed() -> None:
    """The old keys' login goes live while the ROTATE is being stored (it
    replaces the rotating session): once the new keys are stored, it is
    closed AUTH_FAILED, not left live on keys that can no longer log in."""
    h = Harness()
    old = h.add_user(A)
    a = h.raw(A, old)
    a.login()
    stores: list[Any] = []
    real = h.storage.replace_user_keys

    def held(*args: Any) -> Any:  # a slow disk: stored later
        d: Any = Deferred()
        stores.append((args, d))
        return d

    h.storage.replace_user_keys = held  # type: ignore[method-assign]
    new = KeyPair.generate()
    a.send(Rotate(new.enc, new.auth))
    other = h.raw(A, old)
    other.login()  # the old keys still log in: the rotation is not stored yet
    assert ErrorCode.REPLACED in _codes(a.received())
    ((args, d),) = stores
    real(*args).chainDeferred(d)
    assert _codes(other.received()) == [ErrorCode.AUTH_FAILED] and other.closing
    assert not h.router.is_online(A)
    fresh = h.raw(A, new)
    assert fresh.login() == [Directory((A,))]


def test_a_rotate_from_a_session_whose_keys_were_replaced_meanwhile_stores_nothing() -> None:
    """The newcomer's ROTATE is being stored when a token holder logs in
    (replacing it) and sends its own ROTATE: that one is stored after, and
    must not overwrite the newcomer's keys (a takeover); it fails, as the
    session's keys are no longer the user's, and nothing is stored."""
    h = Harness()
    token_keys = h.add_user(C, enrolling_for=3600)
    stores: list[Any] = []
    real = h.storage.replace_user_keys

    def held(*args: Any) -> Any:  # a slow disk: stored later, in order
        d: Any = Deferred()
        stores.append((args, d))
        return d

    c = h.raw(C, token_keys)
    c.login()
    h.storage.replace_user_keys = held  # type: ignore[method-assign]
    new, theirs = KeyPair.generate(), KeyPair.generate()
    c.send(Rotate(new.enc, new.auth))
    intruder = h.raw(C, token_keys)
    intruder.login()
    intruder.send(Rotate(theirs.enc, theirs.auth))
    assert len(stores) == 2
    for args, d in stores:
        real(*args).chainDeferred(d)
    assert _result(h.storage.load_user(C)).keys == new  # type: ignore[union-attr]
    assert intruder.closing and ErrorCode.AUTH_FAILED in _codes(intruder.received())
    assert h.raw(C, new).login() == [Directory((C,))]


def _hold(h: Harness, method: str) -> list[Any]:
    """Replace ``h.storage.<method>`` by a slow one: each call is kept as
    ``(args, deferred, real)`` and fires only when the test says."""
    calls: list[Any] = []
    real = getattr(h.storage, method)

    def held(*args: Any) -> Any:
        d: Any = Deferred()
        calls.append((args, d, real))
        return d

    setattr(h.storage, method, held)
    return calls


def _release(calls: list[Any]) -> None:
    """Let the held calls run, in the order they were made."""
    for args, d, real in calls:
        real(*args).chainDeferred(d)
    calls.clear()


def _rotates_held(h: Harness, *keys: KeyPair) -> tuple[Any, list[Any]]:
    """A logged in, one ROTATE per ``keys`` sent in one frame, their stores held."""
    a = h.raw(A, h.add_user(A))
    a.login()
    stores = _hold(h, "replace_user_keys")
    a.send(*(Rotate(k.enc, k.auth) for k in keys))
    return a, stores


def test_two_rotates_in_a_row_from_one_session_are_both_stored() -> None:
    """A client sends ROTATE twice before the first is stored (/rotate typed
    while the first was on its way): both come from this session, so the
    second is no stale session's and is stored after the first (found by
    the review of 2026-12-07: it was closed AUTH_FAILED)."""
    h = Harness()
    first, second = KeyPair.generate(), KeyPair.generate()
    a, stores = _rotates_held(h, first, second)
    _release(stores)
    got = a.received()
    assert ErrorCode.AUTH_FAILED not in _codes(got) and not a.closing, got
    assert got.count(Rotated()) == 2, got
    assert _result(h.storage.load_user(A)).keys == second  # type: ignore[union-attr]
    assert h.raw(A, second).login() == [Directory((A,))]


def test_the_same_rotate_twice_from_one_session_is_stored_once_more() -> None:
    """The reference client resends its pending keys' ROTATE (same keys) at
    a session start and on /rotate: two in a row must not close the session."""
    h = Harness()
    new = KeyPair.generate()
    a, stores = _rotates_held(h, new, new)
    _release(stores)
    got = a.received()
    assert ErrorCode.AUTH_FAILED not in _codes(got) and not a.closing, got
    assert _result(h.storage.load_user(A)).keys == new  # type: ignore[union-attr]


def test_a_rotate_after_a_failed_one_from_the_same_session_is_stored() -> None:
    """The first ROTATE's store fails (STORAGE_FAILED): the keys are still the
    login's, and the next ROTATE of the session is stored."""
    h = Harness()
    first, second = KeyPair.generate(), KeyPair.generate()
    a, stores = _rotates_held(h, first, second)
    (args, d, _real), later = stores
    stores.remove(later)
    h.storage.fail_writes = True
    _real(*args).chainDeferred(d)
    h.storage.fail_writes = False
    _release([later])
    got = a.received()
    assert _codes(got) == [ErrorCode.STORAGE_FAILED] and not a.closing, got
    assert got.count(Rotated()) == 1
    assert _result(h.storage.load_user(A)).keys == second  # type: ignore[union-attr]


def test_a_session_being_revoked_cannot_act_while_its_removal_is_stored() -> None:
    """The admin revokes A; deleting A's files takes a while (FileStorage:
    behind the storage lock, then a pool job).  Meanwhile A's live session,
    or a login of A past WELCOME, must not go on acting as A: no INVITE
    token for a fresh account, no message to B."""
    h = Harness(router={"allow_invites": True})
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    proving = h.raw(A, ka)
    proving.welcome()
    removals = _hold(h, "remove_user")
    revoked = h.router.revoke(A)
    assert len(removals) == 1
    a.send(Invite(), Send(mid(1), B, b"from a user being revoked"))
    proving.send(Ping(1), Invite(), Send(mid(2), B, b"also"))
    got_a, got_proving = a.received(), proving.received()
    assert not any(isinstance(m, InviteToken) for m in got_a + got_proving)
    assert b.received() == []
    assert not h.router.is_online(A)
    _release(removals)
    assert _result(revoked) == 0
    assert ErrorCode.REVOKED in _codes(got_a + a.received())
    assert ErrorCode.REVOKED in _codes(got_proving + proving.received())
    assert b.received() == [Removed(A)]
    assert _result(h.storage.list_users()) == [B]


def test_a_revocation_storage_refuses_leaves_the_user_able_to_log_in() -> None:
    """A removal refused at once (nothing deleted) leaves the live session
    alone; one that fails later (storage put the user back and says why)
    has ended the session, but a new login goes live: the admin revokes again."""
    from enclaves.storage.interface import StorageFailed

    h = Harness()
    ka = h.add_user(A)
    a = h.raw(A, ka)
    a.login()
    h.storage.fail_writes = True
    assert _result(h.router.revoke(A)).check(StorageFailed)  # type: ignore[union-attr]
    assert h.router.is_online(A) and not a.closing
    h.storage.fail_writes = False
    removals = _hold(h, "remove_user")
    revoked = h.router.revoke(A)
    assert ErrorCode.REVOKED in _codes(a.received()) and not h.router.is_online(A)
    ((_, d, _),) = removals
    d.errback(StorageFailed("the disk refused the write"))
    assert _result(revoked).check(StorageFailed)  # type: ignore[union-attr]
    again = h.raw(A, ka)
    assert again.login() == [Directory((A,))] and h.router.is_online(A)


@pytest.mark.parametrize("live_first", [False, True])
def test_a_login_on_keys_read_while_the_enrollment_ended_goes_live_enrolled(
    live_first: bool,
) -> None:
    """FileStorage stores a ROTATE as the new .user (memory: new keys, still
    enrolling), then the enrollment table.  A login with the new keys whose
    HELLO is read in between (the newcomer's client reconnecting after its
    connection broke) must not go live as *enrolling* once the rotation is
    stored: it would never get DIRECTORY and every SEND would get
    ENROLLMENT_REQUIRED, for as long as the session lasts; nor may one that
    went live just before."""
    from attrs import evolve

    h = Harness()
    ka = h.add_user(A)
    token = h.add_user(C, enrolling_for=3600)
    stores = _hold(h, "replace_user_keys")
    c = h.raw(C, token)
    c.login()
    new = KeyPair.generate()
    c.send(Rotate(new.enc, new.auth))
    ((args, d, real),) = stores
    # The .user file is written: memory holds the new keys, still enrolling.
    record = h.storage._users[C]
    h.storage._users[C] = evolve(record, keys=new)
    c.lose()  # the newcomer's connection breaks before ROTATED
    again = h.raw(C, new)
    again.welcome()  # checked against the record read now
    h.storage._users[C] = record
    if live_first:  # it goes live before the enrollment entry is gone
        again.send(Ping(1))
    real(*args).chainDeferred(d)  # the enrollment entry is gone: stored
    if not live_first:
        again.send(Ping(1))
    out = again.received()
    assert Directory((A, C)) in out, out
    again.send(Send(mid(1), A, b"hello"))
    assert ErrorCode.ENROLLMENT_REQUIRED not in _codes(again.received())
    del ka


def test_messages_in_flight_when_the_connection_drops_keep_their_order() -> None:
    """Window of 4: messages 0-3 go out live, 4 spills to storage, and 0-3
    are stored ahead of it as the window fills.  The recipient's connection
    drops before it acknowledges any; its next login gets 0, 1, 2, 3 first.
    (Stored only at the drop, they came after 4: the reference client's
    replay window drops a message more than 64 behind the newest it has
    seen, so with the default window of 1,000 that lost messages for good.)"""
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


def test_a_message_acknowledged_while_the_spill_stores_it_is_answered_once() -> None:
    """The RECEIVED of a message out to the recipient comes while the spill's
    store of it is in flight: the sender gets ACCEPTED and DELIVERED at once,
    the copy is deleted once written, and nothing is sent twice."""
    h = Harness(router={"max_inflight": 2})
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    stores = _hold(h, "store_message")
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(3)))
    assert [d.msg_id for d in b.received()] == [mid(0), mid(1)]
    assert [args[2] for args, _, _ in stores] == [mid(0), mid(1), mid(2)]  # in order
    b.send(Received(mid(0)))
    assert a.received() == [Accepted(mid(0)), Delivered(mid(0))]
    _release(stores)
    assert a.received() == [Accepted(mid(1)), Accepted(mid(2))]
    assert _pending(h, B) == [mid(1), mid(2)]  # 0's copy is gone
    b.send(Received(mid(1)))
    assert b.received() == [Deliver(mid(2), A, b"2")]  # not 1 again
    assert a.received() == [Delivered(mid(1))]
    b.send(Received(mid(2)))
    assert a.received() == [Delivered(mid(2))]
    assert _pending(h, B) == [] and b.received() == []


def test_a_spill_copy_refused_by_the_quota_leaves_the_live_delivery_standing() -> None:
    """The window fills while the recipient's queue is nearly full: the copy
    of a message out live is refused, and its sender hears nothing of that;
    the RECEIVED answers it as ever.  Only the message that had to wait is
    refused (QUOTA_EXCEEDED)."""
    h = Harness(router={"max_inflight": 2})
    h.storage.max_pending_count = 1
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(3)))
    assert [d.msg_id for d in b.received()] == [mid(0), mid(1)]
    got = a.received()
    assert got[0] == Accepted(mid(0))  # its copy was stored
    assert [(e.code, e.msg_id) for e in got[1:]] == [(ErrorCode.QUOTA_EXCEEDED, mid(2))]
    b.send(Received(mid(0)), Received(mid(1)))
    assert a.received() == [Delivered(mid(0)), Accepted(mid(1)), Delivered(mid(1))]
