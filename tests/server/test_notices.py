"""Notices: DELIVERED and per-message ERRORs for a sender who is offline wait
on disk for its next login (docs/protocol.rst, "Notices")."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail

from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode
from enclaves.inner import (
    Accepted,
    Deliver,
    Delivered,
    Directory,
    Error,
    InnerMessage,
    Ping,
    Pong,
    Received,
    Send,
)
from enclaves.server.router import REVOKED_UNREAD
from enclaves.storage.interface import QuotaExceeded, StorageFailed
from tests.server.harness import Harness, RawClient

A, B, C = 11, 22, 33
DAY = 24 * 3600


def mid(n: int) -> bytes:
    return struct.pack(">16xQ", n)[-16:]


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out
    return out[0]


@pytest.fixture
def h() -> Harness:
    return Harness()


def login(client: RawClient) -> list[InnerMessage]:
    """Log in and answer the server's PINGs, as a client does."""
    return client.answer_pings(client.login())


def test_delivered_waits_for_the_offline_senders_next_login_exactly_once(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"stored"))
    assert a.received() == [Accepted(mid(1))]
    a.lose()  # the sender quits
    b = h.raw(B, kb)
    assert login(b) == [Directory((A, B)), Deliver(mid(1), A, b"stored")]
    b.send(Received(mid(1)))  # hours later, the recipient reads
    assert h.router.stats().notices_kept == 1
    a2 = h.raw(A, ka)
    assert login(a2) == [Directory((A, B)), Delivered(mid(1))]
    assert _result(h.storage.notices_for(A)) == []
    a2.lose()
    a3 = h.raw(A, ka)
    assert login(a3) == [Directory((A, B))]  # once only


def _kept_delivered(h: Harness) -> tuple[KeyPair, KeyPair]:
    """A's message to B was delivered while A was offline: a DELIVERED notice."""
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m"))
    a.received()
    a.lose()
    b = h.raw(B, kb)
    login(b)
    b.send(Received(mid(1)))
    return ka, kb


def test_notices_stay_until_the_client_answers_the_ping_after_them(h: Harness) -> None:
    ka, _ = _kept_delivered(h)
    a2 = h.raw(A, ka)
    directory, delivered, ping = a2.login()
    assert (directory, delivered) == (Directory((A, B)), Delivered(mid(1)))
    assert isinstance(ping, Ping)
    a2.send(Pong(ping.nonce ^ 1))  # not the answer to that PING
    a2.lose()  # the connection broke before the client read them
    a3 = h.raw(A, ka)
    assert login(a3) == [Directory((A, B)), Delivered(mid(1))]  # sent again
    assert _result(h.storage.notices_for(A)) == []
    a3.lose()
    assert login(h.raw(A, ka)) == [Directory((A, B))]


def test_delivered_of_a_live_delivery_after_the_sender_left(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    login(a), login(b)
    a.send(Send(mid(1), B, b"live"))
    assert b.received() == [Deliver(mid(1), A, b"live")]
    a.lose()
    b.send(Received(mid(1)))
    a2 = h.raw(A, ka)
    # ACCEPTED is not kept: the sender's outbox resends, and DELIVERED settles it.
    assert login(a2) == [Directory((A, B)), Delivered(mid(1))]


def test_an_online_sender_gets_no_notice(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m"))
    b = h.raw(B, kb)
    login(b)
    b.send(Received(mid(1)))
    assert a.received() == [Accepted(mid(1)), Delivered(mid(1))]
    assert _result(h.storage.notices_for(A)) == [] and h.router.stats().notices_kept == 0


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (StorageFailed("disk full"), ErrorCode.STORAGE_FAILED),
        (QuotaExceeded("queue full"), ErrorCode.QUOTA_EXCEEDED),
    ],
)
def test_error_after_a_failed_store_reaches_the_sender_that_left(
    h: Harness, refusal: Exception, code: ErrorCode
) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    login(a), login(b)
    a.send(Send(mid(1), B, b"in flight"))
    assert b.received() == [Deliver(mid(1), A, b"in flight")]
    a.lose()
    h.storage.store_message = lambda *_: fail(refusal)  # type: ignore[method-assign]
    b.lose()  # the in-flight message must be stored now, and that fails
    a2 = h.raw(A, ka)
    (directory, error) = login(a2)
    assert directory == Directory((A, B))
    assert isinstance(error, Error) and (error.code, error.msg_id) == (code, mid(1))
    a2.lose()
    assert login(h.raw(A, ka)) == [Directory((A, B))]


def test_error_for_a_revoked_recipient_reaches_the_sender_that_left(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    login(a), login(b)
    a.send(Send(mid(1), B, b"in flight"))
    b.received()
    a.lose()
    _result(h.router.revoke(B))
    assert login(h.raw(A, ka)) == [
        Directory((A,)),
        Error(ErrorCode.UNKNOWN_RECIPIENT, mid(1), "the recipient was revoked"),
    ]


def test_an_offline_sender_hears_of_its_accepted_message_deleted_by_a_revocation(
    h: Harness,
) -> None:
    ka, _ = h.add_user(A), h.add_user(C)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), C, b"stored"))
    assert a.received() == [Accepted(mid(1))]
    a.lose()
    assert _result(h.router.revoke(C)) == 1
    error = Error(ErrorCode.UNKNOWN_RECIPIENT, mid(1), REVOKED_UNREAD)
    assert login(h.raw(A, ka)) == [Directory((A,)), error]
    assert login(h.raw(A, ka)) == [Directory((A,))]


def test_notices_come_after_the_directory_and_before_pending_messages(h: Harness) -> None:
    ka, kb, kc = h.add_user(A), h.add_user(B), h.add_user(C)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"to b"))
    a.received()
    a.lose()
    c = h.raw(C, kc)
    c.login()
    c.send(Send(mid(2), A, b"to a"))  # pending for A
    b = h.raw(B, kb)
    login(b)
    b.send(Received(mid(1)))
    assert login(h.raw(A, ka)) == [
        Directory((A, B, C)),
        Delivered(mid(1)),
        Deliver(mid(2), C, b"to a"),
    ]


def test_cap_keeps_the_newest_notices(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    h.storage.max_notices = 2
    a = h.raw(A, ka)
    login(a)
    a.send(*(Send(mid(i), B, b"%d" % i) for i in range(4)))
    a.received()
    a.lose()
    b = h.raw(B, kb)
    login(b)
    b.send(*(Received(mid(i)) for i in range(4)))
    assert h.router.stats().notices_kept == 4
    assert login(h.raw(A, ka)) == [Directory((A, B)), Delivered(mid(2)), Delivered(mid(3))]


def test_notices_expire_after_thirty_days(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"old"), Send(mid(2), B, b"newer"))
    a.received()
    a.lose()
    b = h.raw(B, kb)
    login(b)
    b.send(Received(mid(1)))
    h.clock.advance(29 * DAY)
    b.send(Received(mid(2)))
    h.clock.advance(1 * DAY + 1)
    assert login(h.raw(A, ka)) == [Directory((A, B)), Delivered(mid(2))]


def test_a_notice_written_while_the_sender_logs_in_is_sent_live(h: Harness) -> None:
    """The notice's write finishes after the login read of notices: it goes out
    at once, with a PING of its own, and stays until that PING is answered."""
    ka, kb = h.add_user(A), h.add_user(B)
    real = h.storage.store_notice
    gate: Deferred[None] = Deferred()

    def slow_store(user_id: int, data: bytes) -> Deferred[int]:
        return gate.addCallback(lambda _: real(user_id, data))

    h.storage.store_notice = slow_store  # type: ignore[method-assign]
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m"))
    a.received()
    a.lose()
    b = h.raw(B, kb)
    login(b)
    b.send(Received(mid(1)))
    a2 = h.raw(A, ka)
    assert login(a2) == [Directory((A, B))]
    gate.callback(None)
    # Sent live, then a PING of its own: deleted only on the PONG.
    delivered, ping = a2.received()
    assert delivered == Delivered(mid(1)) and isinstance(ping, Ping)
    a2.lose()  # no PONG: kept
    a3 = h.raw(A, ka)
    assert login(a3) == [Directory((A, B)), Delivered(mid(1))]
    a3.lose()
    assert login(h.raw(A, ka)) == [Directory((A, B))]


def test_unreadable_notices_do_not_stop_the_session(h: Harness) -> None:
    ka, kb = h.add_user(A), h.add_user(B)
    b = h.raw(B, kb)
    login(b)
    b.send(Send(mid(1), A, b"pending"))
    h.storage.notices_for = lambda _: fail(StorageFailed("disk error"))  # type: ignore[method-assign]
    assert login(h.raw(A, ka)) == [Directory((A, B)), Deliver(mid(1), B, b"pending")]
