"""The frame limit both ways: 65,536 bytes is the protocol's, ``--max-frame`` the server's own.

Every peer accepts frames up to :data:`~enclaves.frames.MAX_FRAME`; the
server's ``--max-frame`` bounds only the frames it sends and the messages it
takes (docs/protocol.rst, "Frames" and "Limits").
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.task import Clock

from enclaves.frames import MAX_FRAME, ErrorCode, Frame
from enclaves.inner import Deliver, Delivered, Directory, Error, Ping, Pong, Received, Send, encode
from enclaves.server.protocol import ServerFactory
from enclaves.server.router import Router
from enclaves.session import max_blob_size
from enclaves.storage.memory import MemoryStorage
from tests.server.harness import LOGIN_NONCE, Harness, RawClient

A, B = 11, 22
SMALL = 16384


def mid(n: int) -> bytes:
    return struct.pack(">16xQ", n)[-16:]


def _small_server() -> Harness:
    return Harness(router={"max_frame": SMALL}, max_frame=SMALL)


def _sizes(frames: list[Frame]) -> list[int]:
    """Each frame's N (its body: version and type, then the payload)."""
    return [2 + len(frame.payload) for frame in frames]


def _open(client: RawClient, frames: list[Frame]) -> list:
    assert client.session is not None
    return [m for f in frames for m in client.session.open(f.payload)]


def test_frames_up_to_the_protocol_limit_are_taken_whatever_max_frame_says() -> None:
    """A client coalesces up to 65,536 bytes (it cannot know the server's
    --max-frame): a server started with --max-frame=16384 takes such a frame
    and keeps the session; what it sends on stays within 16,384."""
    h = _small_server()
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    sends = [Send(mid(i), B, bytes([i]) * 5000) for i in range(12)]
    wire = a.session.seal(sends)  # type: ignore[union-attr]
    assert SMALL < len(wire) - 4 <= MAX_FRAME  # one frame, above the server's own limit
    a.write(wire)
    assert not a.closing and a.received() == []
    frames = b.frames()
    assert len(frames) > 1 and max(_sizes(frames)) <= SMALL
    assert _open(b, frames) == [Deliver(s.msg_id, A, s.blob) for s in sends]
    b.send(*(Received(s.msg_id) for s in sends))
    assert [m for m in a.received() if isinstance(m, Delivered)] == [
        Delivered(s.msg_id) for s in sends
    ]


def test_a_frame_above_the_protocol_limit_is_still_refused_and_dropped() -> None:
    h = _small_server()
    a = h.raw(A, h.add_user(A))
    a.login()
    a.write(struct.pack(">I", MAX_FRAME + 1))
    assert [m.code for m in a.received() if isinstance(m, Error)] == [ErrorCode.FRAME_TOO_LARGE]
    assert a.closing and not h.router.is_online(A)


def test_a_send_whose_deliver_would_not_fit_is_refused_alone() -> None:
    """Over --max-frame the SEND gets MESSAGE_TOO_LARGE for its msg_id, naming
    the limit; the session stays open and the SENDs around it go through."""
    h = _small_server()
    ka, kb = h.add_user(A), h.add_user(B)
    a, b = h.raw(A, ka), h.raw(B, kb)
    a.login(), b.login()
    limit = max_blob_size(SMALL)
    assert h.router.max_blob == limit
    a.send(
        Send(mid(1), B, b"before"),
        Send(mid(2), B, bytes(limit + 1)),
        Send(mid(3), B, bytes(limit)),  # the largest taken: its DELIVER fits a frame
        Send(mid(4), B, b"after"),
    )
    (refusal,) = a.received()
    assert isinstance(refusal, Error)
    assert (refusal.code, refusal.msg_id) == (ErrorCode.MESSAGE_TOO_LARGE, mid(2))
    assert f"at most {limit} bytes" in refusal.text
    assert not a.closing and h.router.is_online(A)
    frames = b.frames()
    assert max(_sizes(frames)) <= SMALL
    assert [m.msg_id for m in _open(b, frames)] == [mid(1), mid(3), mid(4)]


def _store(h: Harness, recipient: int, sender: int, n: int, blob: bytes) -> None:
    stored: list[object] = []
    h.storage.store_message(recipient, sender, mid(n), blob).addBoth(stored.append)
    assert isinstance(stored[0], int), stored


def _login_frames(client: RawClient) -> list[Frame]:
    """HELLO, WELCOME and the first sealed frame; the frames the server sends then."""
    client.welcome()
    client.send(Ping(LOGIN_NONCE))
    return client.frames()


def test_stored_delivers_are_never_coalesced_above_max_frame() -> None:
    """At login the DIRECTORY, notices and stored DELIVERs share frames of at
    most --max-frame.  One stored under an earlier, larger --max-frame (here a
    60,000-byte blob, taken at 65,536) goes alone in a frame of its own, within
    the protocol's limit, instead of ending the session at every login."""
    h = _small_server()
    h.storage.max_pending_bytes = 1 << 20
    h.add_user(A)
    kb = h.add_user(B)
    order = [6000] * 5 + [60_000] + [6000] * 5 + [60_000, 60_000]
    for n, size in enumerate(order):
        _store(h, B, A, n, bytes([n]) * size)
    h.storage.store_notice(B, encode(Delivered(mid(99))))
    b = h.raw(B, kb)
    frames = _login_frames(b)
    per_frame = [b.session.open(f.payload) for f in frames]  # type: ignore[union-attr]
    sizes = _sizes(frames)
    # Every frame within --max-frame but the three big DELIVERs, each alone.
    assert [(len(m), size) for m, size in zip(per_frame, sizes, strict=True) if size > SMALL] == [
        (1, size) for size in sizes if size > 60_000
    ]
    assert len([size for size in sizes if size > SMALL]) == 3 and max(sizes) <= MAX_FRAME
    messages = [m for ms in per_frame for m in ms if not isinstance(m, Ping | Pong)]
    assert messages[:2] == [Directory((A, B)), Delivered(mid(99))]
    assert [(m.msg_id, len(m.blob)) for m in messages[2:]] == [
        (mid(n), size) for n, size in enumerate(order)
    ]
    assert not b.closing and h.router.is_online(B)


def _largest_max_frame_option() -> int:
    """The largest ``--max-frame`` that ``twistd enclaves`` takes."""
    from twisted.python import usage

    from enclaves.tap import Options

    taken = []
    for value in (MAX_FRAME, 131072, 1 << 24):
        try:
            Options().parseOptions([f"--max-frame={value}", "--data-dir=unused"])
        except usage.UsageError:
            continue
        taken.append(value)
    return max(taken)


def test_two_stored_large_delivers_are_never_one_frame() -> None:
    """The clean-room finding: at --max-frame=131072 two stored 60,000-byte
    DELIVERs came as one 120,106-byte frame, which no client takes, so they
    could never be read.  Whatever --max-frame the option takes, every frame
    stays within the protocol's limit."""
    largest = _largest_max_frame_option()
    h = Harness(router={"max_frame": largest}, max_frame=largest)
    h.storage.max_pending_bytes = 1 << 20
    kb = h.add_user(B)
    h.add_user(A)
    _store(h, B, A, 1, bytes(60_000))
    _store(h, B, A, 2, bytes(60_000))
    b = h.raw(B, kb)
    frames = _login_frames(b)  # the harness decoder refuses anything above MAX_FRAME
    assert max(_sizes(frames)) <= MAX_FRAME
    assert [m.msg_id for m in _open(b, frames) if isinstance(m, Deliver)] == [mid(1), mid(2)]


@pytest.mark.parametrize("sender_online", [False, True])
def test_a_stored_message_no_frame_can_carry_is_deleted_and_its_sender_told(
    sender_online: bool,
) -> None:
    """Stored by an older server run above the protocol's limit: no client
    can take its DELIVER.  It is deleted unread, and its sender (told
    ACCEPTED then) gets MESSAGE_TOO_LARGE for it, live or as a notice; the
    other messages are delivered and the session stays."""
    h = _small_server()
    h.storage.max_pending_bytes = 1 << 20
    kb, ka = h.add_user(B), h.add_user(A)
    _store(h, B, A, 1, b"one")
    _store(h, B, A, 2, bytes(max_blob_size(MAX_FRAME) + 1))
    _store(h, B, A, 3, b"three")
    a = h.raw(A, ka)
    if sender_online:
        a.answer_pings(a.login())
    b = h.raw(B, kb)
    assert [m.msg_id for m in b.login() if isinstance(m, Deliver)] == [mid(1), mid(3)]
    assert not b.closing and h.router.is_online(B)
    pending: list[Any] = []
    h.storage.pending_for(B).addBoth(pending.append)
    assert [m.msg_id for m in pending[0]] == [mid(1), mid(3)]
    told = a.received() if sender_online else a.answer_pings(a.login())
    errors = [m for m in told if isinstance(m, Error)]
    assert [(e.code, e.msg_id) for e in errors] == [(ErrorCode.MESSAGE_TOO_LARGE, mid(2))]
    assert "deleted unread" in errors[0].text
    b2 = h.raw(B, kb)  # nothing is tried again at the next login
    b.lose()
    assert [m.msg_id for m in b2.login() if isinstance(m, Deliver)] == [mid(1), mid(3)]


@pytest.mark.parametrize("max_frame", [MAX_FRAME + 1, 131072])
def test_a_send_limit_above_the_protocol_limit_is_refused(max_frame: int) -> None:
    storage, clock = MemoryStorage(), Clock()
    with pytest.raises(ValueError, match="65536"):
        Router(storage, clock, max_frame=max_frame)
    with pytest.raises(ValueError, match="65536"):
        ServerFactory(Router(storage, clock), storage, clock, max_frame=max_frame)
