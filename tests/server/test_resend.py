"""Resent messages: a SEND with the msg_id of a message of its sender already
stored (or being stored) for the recipient is answered from that copy and not
stored again (docs/protocol.rst, "Delivery"; docs/storage.rst, "Resent
messages").

A client resends every message it has no ACCEPTED for after reconnecting;
the ACCEPTED of a message that was being stored is lost when the sender's
connection ends first.  The resend must not then be refused (QUOTA_EXCEEDED
for a message that will be delivered), stored twice (a second DELIVERED,
quota and disk), or answered twice.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred

from enclaves.frames import ErrorCode
from enclaves.inner import (
    Accepted,
    Deliver,
    Delivered,
    Directory,
    Error,
    InnerMessage,
    Received,
    Removed,
    Send,
    decode_all,
)
from enclaves.server.router import REVOKED_UNREAD
from enclaves.session import max_blob_size
from enclaves.storage.interface import StoredMessage
from tests.server.harness import Harness, RawClient
from tests.server.test_router_order import HeldStores, harness

A, B = 11, 22


def mid(n: int) -> bytes:
    return struct.pack(">QQ", 5, n)


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out
    return out[0]


def copies(h: Harness, recipient: int = B) -> list[bytes]:
    """msg_id of every copy stored for ``recipient``, in arrival order."""
    return [m.msg_id for m in _result(h.storage.pending_for(recipient))]


def login(client: RawClient) -> list[InnerMessage]:
    """Log in and answer the server's PINGs, as a client does."""
    return client.answer_pings(client.login())


def sent_while_held(
    h: Harness, storage: HeldStores, *numbers: int, stored: bool = False
) -> RawClient:
    """A sends ``numbers`` to offline B; its connection ends before the stores
    finish, so their ACCEPTED is lost with it.  Returns A's next session,
    logged in while the stores are still in flight, or once they are done
    (``stored``)."""
    ka = h.add_user(A)
    h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    storage.holding = True
    a.send(*(Send(mid(n), B, b"m%d" % n) for n in numbers))
    a.lose()
    if stored:
        storage.holding = False
        storage.release()
    a2 = h.raw(A, ka)
    assert login(a2) == [Directory((A, B))]
    return a2


def read_all(h: Harness, count: int) -> RawClient:
    """B logs in, gets ``count`` DELIVERs and acknowledges them."""
    b = h.raw(B, h.storage._users[B].keys)
    got = login(b)
    assert got[0] == Directory((A, B)) and len(got) == count + 1, got
    b.send(*(Received(m.msg_id) for m in got[1:]))  # type: ignore[union-attr]
    return b


def test_resend_while_the_first_store_is_in_flight_waits_for_it() -> None:
    h, storage = harness()
    a2 = sent_while_held(h, storage, 1)
    a2.send(Send(mid(1), B, b"m1"))  # the outbox resends
    assert a2.received() == []  # not ACCEPTED before the first store is done
    storage.holding = False
    storage.release()
    assert a2.received() == [Accepted(mid(1))]  # once
    assert copies(h) == [mid(1)]
    read_all(h, 1)
    assert a2.received() == [Delivered(mid(1))]  # once


def test_resend_while_the_first_store_fails_gets_its_error_once() -> None:
    h, storage = harness()
    a2 = sent_while_held(h, storage, 1)
    a2.send(Send(mid(1), B, b"m1"))
    storage.fail_writes = True
    storage.release()
    assert a2.received() == [
        Error(int(ErrorCode.STORAGE_FAILED), mid(1), "the server could not store the message")
    ]
    assert copies(h) == []


def test_resend_while_the_first_store_fails_keeps_one_notice_for_an_offline_sender() -> None:
    h, storage = harness()
    a2 = sent_while_held(h, storage, 1)
    a2.send(Send(mid(1), B, b"m1"))
    a2.lose()
    storage.max_pending_count = 0  # B's queue filled up meanwhile
    storage.release()
    assert h.router.stats().notices_kept == 1
    ((_, data),) = _result(h.storage.notices_for(A))
    assert decode_all(data) == [
        Error(int(ErrorCode.QUOTA_EXCEEDED), mid(1), "the recipient's queue is full")
    ]


def test_resend_of_a_stored_message_with_the_quota_full_is_accepted() -> None:
    """The clean-room report: three messages fill B's quota, their ACCEPTED is
    lost; the resends were refused with QUOTA_EXCEEDED, yet all three came."""
    h, storage = harness()
    storage.max_pending_count = 3
    a2 = sent_while_held(h, storage, 1, 2, 3, stored=True)
    a2.send(*(Send(mid(n), B, b"m%d" % n) for n in (1, 2, 3)))
    assert a2.received() == [Accepted(mid(n)) for n in (1, 2, 3)]
    assert copies(h) == [mid(1), mid(2), mid(3)]
    a2.send(Send(mid(4), B, b"m4"))  # a new message: the quota is full
    assert [m.code for m in a2.received()] == [int(ErrorCode.QUOTA_EXCEEDED)]  # type: ignore[union-attr]
    read_all(h, 3)
    assert a2.received() == [Delivered(mid(n)) for n in (1, 2, 3)]


def test_resend_of_a_stored_message_is_not_stored_twice() -> None:
    h, storage = harness()
    a2 = sent_while_held(h, storage, 1, 2, stored=True)
    a2.send(Send(mid(1), B, b"m1"), Send(mid(2), B, b"m2"))
    assert a2.received() == [Accepted(mid(1)), Accepted(mid(2))]
    assert copies(h) == [mid(1), mid(2)]
    assert _result(h.storage.pending_summary())[B].count == 2
    read_all(h, 2)
    assert a2.received() == [Delivered(mid(1)), Delivered(mid(2))]  # one each
    assert copies(h) == []


def test_resend_while_the_stored_copy_is_out_to_the_recipient_is_accepted_at_once() -> None:
    h = Harness()
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m1"))  # stored: B is offline
    a.lose()  # before A read the ACCEPTED
    b = h.raw(B, kb)
    assert login(b) == [Directory((A, B)), Deliver(mid(1), A, b"m1")]  # in flight to B
    a2 = h.raw(A, ka)
    login(a2)
    a2.send(Send(mid(1), B, b"m1"))
    assert a2.received() == [Accepted(mid(1))]  # it is on disk: no need to wait
    assert b.received() == []  # not delivered twice
    b.send(Received(mid(1)))
    assert a2.received() == [Delivered(mid(1))]  # once
    assert copies(h) == []


def test_recipient_leaving_after_a_resend_of_its_stored_copy_stores_nothing_more() -> None:
    h = Harness()
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m1"))
    a.lose()
    b = h.raw(B, kb)
    login(b)
    a2 = h.raw(A, ka)
    login(a2)
    a2.send(Send(mid(1), B, b"m1"))
    a2.received()
    b.lose()  # before RECEIVED: only live messages in flight get stored
    assert copies(h) == [mid(1)]
    b2 = h.raw(B, kb)
    assert login(b2) == [Directory((A, B)), Deliver(mid(1), A, b"m1")]
    b2.send(Received(mid(1)))
    assert a2.received() == [Delivered(mid(1))]


def test_resend_while_the_recipient_logs_in_and_its_store_finishes() -> None:
    """B logs in while A's message is being written; A's resend waits with
    B's live messages, and the stored copy answers it."""
    h, storage = harness()
    a2 = sent_while_held(h, storage, 1)
    b = h.raw(B, h.storage._users[B].keys)
    assert login(b) == [Directory((A, B))]  # waiting for the store
    a2.send(Send(mid(1), B, b"m1"))
    storage.holding = False
    storage.release()
    assert b.received() == [Deliver(mid(1), A, b"m1")]
    assert a2.received() == [Accepted(mid(1))]
    b.send(Received(mid(1)))
    assert a2.received() == [Delivered(mid(1))]
    assert copies(h) == []


def test_resend_after_the_recipient_acknowledged_is_stored_and_delivered_again() -> None:
    """The copy is gone, and so is any trace of the message: the resend is a
    new message to the server, and the recipient drops the duplicate (the
    design, docs/protocol.rst "Delivery")."""
    h = Harness()
    ka, kb = h.add_user(A), h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m1"))
    assert a.received() == [Accepted(mid(1))]
    b = h.raw(B, kb)
    login(b)
    b.send(Received(mid(1)))
    assert a.received() == [Delivered(mid(1))]
    b.lose()
    a.send(Send(mid(1), B, b"m1"))  # e.g. a client restored from an older keystore
    assert a.received() == [Accepted(mid(1))]
    assert copies(h) == [mid(1)]


def test_resend_while_the_store_is_in_flight_and_the_recipient_is_revoked() -> None:
    h, storage = harness()
    a2 = sent_while_held(h, storage, 1)
    a2.send(Send(mid(1), B, b"m1"))
    assert _result(h.router.revoke(B)) == 0  # nothing on disk yet
    storage.release()
    assert a2.received() == [
        Removed(B),
        Error(int(ErrorCode.UNKNOWN_RECIPIENT), mid(1), "no such user"),  # once
    ]


def test_resend_after_a_stored_message_was_deleted_by_revocation() -> None:
    h = Harness()
    ka = h.add_user(A)
    h.add_user(B)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m1"))
    assert a.received() == [Accepted(mid(1))]
    assert _result(h.router.revoke(B)) == 1
    assert a.received() == [
        Removed(B),
        Error(int(ErrorCode.UNKNOWN_RECIPIENT), mid(1), REVOKED_UNREAD),
    ]
    a.send(Send(mid(1), B, b"m1"))
    assert a.received() == [Error(int(ErrorCode.UNKNOWN_RECIPIENT), mid(1), "no such user")]


def test_sends_before_the_one_over_the_rate_are_stored_once_across_the_resend() -> None:
    """MESSAGE_RATE ends the session in the middle of a frame: the SENDs before
    the one over the rate were routed, and the ACCEPTED of those still being
    stored is lost with the session (docs/protocol.rst, "Limits").  The
    client resends them; the copies answer them."""
    h, storage = harness(message_rate=3)
    a2 = sent_while_held(h, storage, 1, 2, 3, 4, stored=True)  # the 4th is over the rate
    assert copies(h) == [mid(1), mid(2), mid(3)]
    h.clock.advance(1)
    a2.send(*(Send(mid(n), B, b"m%d" % n) for n in (1, 2, 3)))
    h.clock.advance(1)
    a2.send(Send(mid(4), B, b"m4"))
    assert a2.received() == [Accepted(mid(n)) for n in (1, 2, 3, 4)]
    assert copies(h) == [mid(1), mid(2), mid(3), mid(4)]


def _resend_waiting_for_login(h: Harness, storage: HeldStores) -> tuple[RawClient, RawClient]:
    """B is logging in (waiting for a store of C's); A's message and, after A
    reconnected, its resend both wait for B's session to be ready."""
    ka, kb, kc = h.add_user(A), h.add_user(B), h.add_user(33)
    c = h.raw(33, kc)
    login(c)
    storage.holding = True
    c.send(Send(mid(9), B, b"c"))
    b = h.raw(B, kb)
    login(b)
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, b"m1"))
    a.lose()
    a2 = h.raw(A, ka)
    login(a2)
    a2.send(Send(mid(1), B, b"m1"))
    return a2, b


def test_resend_waiting_for_the_recipients_login_is_stored_once_if_it_leaves() -> None:
    h, storage = harness()
    a2, b = _resend_waiting_for_login(h, storage)
    b.lose()
    storage.holding = False
    storage.release()
    assert a2.received() == [Accepted(mid(1))]
    assert copies(h) == [mid(9), mid(1)]


def test_resend_waiting_for_the_recipients_login_gets_one_error_on_revocation() -> None:
    h, storage = harness()
    a2, _ = _resend_waiting_for_login(h, storage)
    _result(h.router.revoke(B))
    assert a2.received() == [
        Error(int(ErrorCode.UNKNOWN_RECIPIENT), mid(1), "the recipient was revoked"),  # once
        Removed(B),
    ]


def test_copies_stored_twice_by_an_older_server_are_delivered_and_answered_once() -> None:
    """A data directory from before resends were recognised may hold two
    copies of one message: one DELIVER, both deleted, one DELIVERED."""
    h = Harness()
    ka, kb = h.add_user(A), h.add_user(B)
    for file_id in (1, 2):  # as the old server stored them, bypassing today's check
        h.storage._messages[file_id] = StoredMessage(file_id, B, A, mid(1), b"m1")
    a = h.raw(A, ka)
    login(a)
    b = h.raw(B, kb)
    assert login(b) == [Directory((A, B)), Deliver(mid(1), A, b"m1")]
    b.send(Received(mid(1)))
    assert a.received() == [Delivered(mid(1))]
    assert copies(h) == []


# -- a copy stored while --max-frame was larger ---------------------------------

SMALL = 16384
LARGE_BLOB = bytes(30_000)  # fits a 65,536-byte frame, not a 16,384-byte one


def lowered_max_frame() -> tuple[Harness, Any, Any]:
    """A server now at --max-frame 16384 holding A's 30,000-byte message to B,
    stored while it ran at 65536 (A's connection ended before the ACCEPTED)."""
    h = Harness(router={"max_frame": SMALL}, max_frame=SMALL)
    h.storage.max_pending_bytes = 1 << 20
    ka, kb = h.add_user(A), h.add_user(B)
    assert max_blob_size(SMALL) < len(LARGE_BLOB) <= max_blob_size(65536)
    assert isinstance(_result(h.storage.store_message(B, A, mid(1), LARGE_BLOB)), int)
    return h, ka, kb


def too_large(messages: list[InnerMessage]) -> list[tuple[int, bytes]]:
    return [(m.code, m.msg_id) for m in messages if isinstance(m, Error)]


def test_resend_of_a_copy_above_a_lowered_max_frame_is_accepted_by_its_copy() -> None:
    """The protocol's answer to a resend: its copy answers it.  Without that
    A's client would mark as failed for good a message B then gets."""
    h, ka, kb = lowered_max_frame()
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, LARGE_BLOB))  # the outbox resends it
    assert a.received() == [Accepted(mid(1))]
    assert copies(h) == [mid(1)]  # not stored again
    b = h.raw(B, kb)
    assert [m.msg_id for m in login(b) if isinstance(m, Deliver)] == [mid(1)]
    b.send(Received(mid(1)))
    assert a.received() == [Delivered(mid(1))]
    assert copies(h) == []


def test_a_new_message_above_the_lowered_max_frame_is_still_too_large() -> None:
    h, ka, _ = lowered_max_frame()
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(2), B, LARGE_BLOB))  # another msg_id
    a.send(Send(mid(1), 33, LARGE_BLOB))  # the same msg_id to another recipient
    a.send(Send(mid(1), 0, LARGE_BLOB))  # to nobody
    code = int(ErrorCode.MESSAGE_TOO_LARGE)
    assert too_large(a.received()) == [(code, mid(2)), (code, mid(1)), (code, mid(1))]
    assert copies(h) == [mid(1)]


def test_resend_above_a_lowered_max_frame_while_the_copy_is_out_to_the_recipient() -> None:
    h, ka, kb = lowered_max_frame()
    b = h.raw(B, kb)
    assert [m.msg_id for m in login(b) if isinstance(m, Deliver)] == [mid(1)]  # in flight
    a = h.raw(A, ka)
    login(a)
    a.send(Send(mid(1), B, LARGE_BLOB))
    assert a.received() == [Accepted(mid(1))]
    assert b.received() == []  # not delivered twice
    b.send(Received(mid(1)))
    assert a.received() == [Delivered(mid(1))]
