"""Known defects, each a strict xfail: the test states what should hold and
fails today; the day it passes, pytest fails it until the marker goes.
Found by the review of 2026-12-07 and left for later work.
"""

from __future__ import annotations

import struct

import pytest

from enclaves.inner import Accepted, Deliver, Send
from enclaves.session import max_blob_size
from tests.server.harness import Harness

A, B = 11, 22
SMALL = 16384


def mid(n: int) -> bytes:
    return struct.pack(">QQ", 7, n)


@pytest.mark.xfail(
    strict=True,
    reason="the router refuses an oversize SEND before looking for a held copy (docs: Resends)",
)
def test_resend_of_a_held_message_above_a_lowered_max_frame_is_answered_by_its_copy() -> None:
    """A's 30,000-byte message to offline B was stored by this server while it
    ran at --max-frame 65536; A's connection ended before the ACCEPTED.  The
    admin restarts it at --max-frame 16384.  A reconnects and resends, as the
    protocol says: the stored copy must answer (ACCEPTED), as it does for any
    other resend.  Instead A is told MESSAGE_TOO_LARGE (its client marks the
    message failed for good) and B still gets the message."""
    h = Harness(router={"max_frame": SMALL}, max_frame=SMALL)
    h.storage.max_pending_bytes = 1 << 20
    ka, kb = h.add_user(A), h.add_user(B)
    blob = bytes(30_000)
    assert max_blob_size(SMALL) < len(blob) <= max_blob_size(65536)
    stored: list[object] = []
    h.storage.store_message(B, A, mid(1), blob).addBoth(stored.append)  # the earlier run
    assert isinstance(stored[0], int)

    a = h.raw(A, ka)
    a.answer_pings(a.login())
    a.send(Send(mid(1), B, blob))  # the outbox resends it
    answer = a.received()
    b = h.raw(B, kb)
    delivered = [m.msg_id for m in b.login() if isinstance(m, Deliver)]
    assert delivered == [mid(1)]  # the copy is delivered all the same ...
    assert answer == [Accepted(mid(1))], answer  # ... so the resend must not be refused
