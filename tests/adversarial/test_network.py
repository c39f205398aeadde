"""A network attacker on the path between client and daemon (tests/adversarial/proxy.py).

The attacker reads, drops, changes, replays, truncates and injects bytes, and
opens as many connections as it likes.  What must hold in every case: no
forged, replayed or foreign frame is acted on; the victim's session ends with
a clear code (the worst the attacker achieves is a closed connection); no
message is lost or delivered twice; and the daemon keeps serving an honest
pair with no Traceback in its log (:meth:`Live.check`).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred

from enclaves.client.connection import ClientConnection, Disconnected, LoginFailed
from enclaves.frames import ErrorCode, FrameDecoder, FrameType, decode_error
from enclaves.inner import Accepted, Deliver, Delivered, Directory, Ping, Pong, Received, Send
from tests.adversarial.live import A, B, Live, barrier
from tests.adversarial.proxy import C2S, S2C, Edit, Pipe, Proxy
from tests.system.helpers import expect, quiet

pytestmark = pytest.mark.system

MAX = 65536
FAILED_CHECK = "sealed frame failed its check"  # refused for its keys, not its seq


def flip(direction: str, index: int, offset: int, mask: int) -> Edit:
    """Flip ``mask`` at ``offset`` (negative: from the end) of one frame."""

    def edit(pipe: Pipe, d: str, i: int, raw: bytes) -> bytes:
        if (d, i) != (direction, index):
            return raw
        out = bytearray(raw)
        out[offset] ^= mask
        return bytes(out)

    return edit


def ended(conn: ClientConnection, seconds: float = 10.0) -> Deferred[Disconnected]:
    """``conn.closed``, bounded: a connection the attacker failed to end fails the test."""
    return conn.closed.addTimeout(seconds, reactor)


def delivers(messages: list[object]) -> list[bytes]:
    return [m.msg_id for m in messages if isinstance(m, Deliver)]


def raw_exchange(
    port: int, data: bytes, half_close: bool = True, limit: float = 10.0, source: str = ""
) -> bytes:
    """Send ``data`` on a fresh socket, then read until the daemon closes."""
    where = ("127.0.0.1", port)
    with socket.create_connection(where, timeout=limit, source_address=(source, 0)) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def error_code(reply: bytes) -> int:
    (frame,) = FrameDecoder(1 << 20).feed(reply)
    assert frame.type is FrameType.ERROR, frame
    return decode_error(frame.payload)[0]


async def _login_then_closed(live: Live, proxy: Proxy) -> int | None:
    """Log A in through the proxy; the code that ended the connection.

    WELCOME and the tampered frame may arrive in one read: then the login
    itself fails.  Either way nothing of the tampered frame reached A.
    """
    try:
        a = await live.login(A, port=proxy.port)
    except LoginFailed as refused:
        return refused.code
    reason = await ended(a)
    assert a.inbox.pending == []
    return reason.code


# HELLO on the wire: prefix 0-3, version 4, type 5, user id 6-13, nc 14-45,
# ec_pub 46-77, tag 78-93.  WELCOME: ns 6-37, es_pub 38-69, tag 70-85.
# SEALED: seq 6-13, IV 14-29, ciphertext, tag the last 16.  The SEALED body
# length is always 42 + 16k, so flipping bit 1 of the prefix shortens it by two.
HELLO_FLIPS = [
    ("length prefix", 0, 0x80, ErrorCode.FRAME_TOO_LARGE),
    ("version", 4, 0x01, ErrorCode.BAD_FRAME),
    ("type", 5, 0x01, ErrorCode.BAD_FRAME),
    ("user id", 13, 0x01, ErrorCode.AUTH_FAILED),
    ("nc", 20, 0x10, ErrorCode.AUTH_FAILED),
    ("ec_pub", 50, 0x04, ErrorCode.AUTH_FAILED),
    ("tag", 93, 0x80, ErrorCode.AUTH_FAILED),
]
WELCOME_FLIPS = [
    ("length prefix", 0, 0x80, ErrorCode.FRAME_TOO_LARGE),
    ("version", 4, 0x01, ErrorCode.BAD_FRAME),
    ("type", 5, 0x04, ErrorCode.BAD_FRAME),
    ("ns", 10, 0x01, ErrorCode.AUTH_FAILED),
    ("es_pub", 40, 0x01, ErrorCode.AUTH_FAILED),
    ("tag", 85, 0x01, ErrorCode.AUTH_FAILED),
]
SEALED_FLIPS = [
    ("length prefix", 3, 0x02, ErrorCode.BAD_SESSION_FRAME),
    ("version", 4, 0x01, ErrorCode.BAD_FRAME),
    ("type", 5, 0x01, ErrorCode.BAD_FRAME),
    ("seq", 13, 0x01, ErrorCode.BAD_SESSION_FRAME),
    ("IV", 20, 0x01, ErrorCode.BAD_SESSION_FRAME),
    ("ciphertext", 40, 0x01, ErrorCode.BAD_SESSION_FRAME),
    ("tag", -1, 0x01, ErrorCode.BAD_SESSION_FRAME),
]


@pytest_twisted.ensureDeferred
async def test_a_bit_flip_in_any_field_ends_only_that_connection(tmp_path: Path) -> None:
    """The attacker flips one bit of each field of HELLO, WELCOME and SEALED frames
    (both ways).  Each time the connection ends with the documented code, the
    tampered frame is never acted on (no DELIVER to B, nothing in A's inbox),
    and the daemon serves everyone else."""
    live = await Live(tmp_path, "--handshake-timeout=3").start()
    proxy = Proxy(live.port)
    await proxy.listen()
    b = await live.login(B)
    try:
        # Every tampered handshake is a failed one for the source's rate limit
        # (a refused HELLO, a WELCOME the client drops, a first SEALED frame
        # that does not open): each case comes from its own address.
        for i, (name, offset, mask, code) in enumerate(HELLO_FLIPS):
            proxy.source = f"127.0.2.{i + 1}"
            proxy.edit = flip(C2S, 0, offset, mask)
            with pytest.raises(LoginFailed) as refused:
                await live.login(A, port=proxy.port)
            assert refused.value.code == code, name
        for i, (name, offset, mask, code) in enumerate(WELCOME_FLIPS):
            proxy.source = f"127.0.3.{i + 1}"
            proxy.edit = flip(S2C, 0, offset, mask)
            with pytest.raises(LoginFailed) as refused:
                await live.login(A, port=proxy.port)
            assert refused.value.code == code, name
        sent = []
        for i, (name, offset, mask, code) in enumerate(SEALED_FLIPS):
            proxy.source = f"127.0.1.{i + 1}"
            proxy.edit = flip(C2S, 1, offset, mask)  # A's first SEALED: the login PING
            a = await live.login(A, port=proxy.port)
            sent.append(os.urandom(16))
            a.send(Send(sent[-1], B, b"tampered on the way"))
            assert (await ended(a)).code == code, name
            proxy.edit = flip(S2C, 1, offset, mask)  # the daemon's first SEALED: DIRECTORY
            assert await _login_then_closed(live, proxy) == code, name
        assert not set(delivers(await barrier(b))) & set(sent)
    finally:
        await b.disconnect()
        await proxy.close()
    await live.check(bind="127.0.0.2")
    live.stop()


@pytest_twisted.ensureDeferred
async def test_length_prefixes_0_1_max_and_2_32_minus_1(tmp_path: Path) -> None:
    """The attacker sends frames whose length prefix is 0, 1, the limit, the limit
    + 1 and 2^32-1, before a session and injected into live sessions both ways.
    0 and 1 are BAD_FRAME; the limit is read whole and refused for what it holds;
    above it is FRAME_TOO_LARGE from the prefix alone (the daemon waits for no
    body); nothing crashes."""
    live = await Live(tmp_path).start()
    before_session = {
        0: (struct.pack(">I", 0), ErrorCode.BAD_FRAME),
        1: (struct.pack(">I", 1) + b"\x01", ErrorCode.BAD_FRAME),
        MAX: (struct.pack(">I", MAX) + b"\x01\x01" + bytes(MAX - 2), ErrorCode.BAD_FRAME),
        MAX + 1: (struct.pack(">I", MAX + 1), ErrorCode.FRAME_TOO_LARGE),
        2**32 - 1: (struct.pack(">I", 2**32 - 1), ErrorCode.FRAME_TOO_LARGE),
    }
    for size, (data, code) in before_session.items():
        # No half-close for the large ones: the refusal must not wait for a body.
        reply = raw_exchange(live.port, data, half_close=size <= MAX)
        assert error_code(reply) == code, size
    in_session = {
        0: ErrorCode.BAD_FRAME,
        1: ErrorCode.BAD_FRAME,
        MAX: ErrorCode.BAD_SESSION_FRAME,
        MAX + 1: ErrorCode.FRAME_TOO_LARGE,
        2**32 - 1: ErrorCode.FRAME_TOO_LARGE,
    }
    proxy = Proxy(live.port)
    await proxy.listen()
    try:
        for size, code in in_session.items():
            junk = struct.pack(">I", size)
            if size in (1, MAX):
                body = bytes([1, FrameType.SEALED]) + os.urandom(max(size - 2, 0))
                junk += body[:size]
            for direction in (C2S, S2C):
                a = await live.login(A, port=proxy.port)
                await expect(a, Directory)
                proxy.pipes[-1].inject(direction, junk)
                assert (await ended(a)).code == code, (size, direction)
    finally:
        await proxy.close()
    await live.check()
    live.stop()


@pytest_twisted.ensureDeferred
async def test_replayed_hello_and_session_frames(tmp_path: Path) -> None:
    """The attacker records A's connection (HELLO, the login PING, a sealed SEND)
    and replays it, later and while A is online.  A replayed HELLO is answered
    (the server cannot tell it from a new one) but the attacker holds no session
    keys: its first SEALED frame does not open, so the replay never goes live —
    B gets the message once, and A's live session is not touched: messages to A
    meanwhile reach A at once."""
    live = await Live(tmp_path).start()
    proxy = Proxy(live.port)
    await proxy.listen()
    b = await live.login(B)
    try:
        a = await live.login(A, port=proxy.port)
        first = await live.exchange(a, b, b"say it once")
        await a.disconnect()
        hello, *sealed = proxy.pipes[0].frames[C2S]
        reply = raw_exchange(live.port, hello + b"".join(sealed), half_close=False)
        frames = FrameDecoder(1 << 20).feed(reply)
        assert frames[0].type is FrameType.WELCOME
        assert [f.type for f in frames[1:]] == [FrameType.SEALED]  # the sealed ERROR
        assert first not in delivers(await barrier(b))
        assert "BAD_SESSION_FRAME" in live.daemon.log_text()
        # A replayed frame inside a live session is refused too.
        proxy.edit = lambda pipe, d, i, raw: raw * 2 if (d, i) == (C2S, 2) else raw
        a = await live.login(A, port=proxy.port)
        await expect(a, Directory)  # the login PING went alone: the SEND is frame 2
        twice = os.urandom(16)
        a.send(Send(twice, B, b"doubled on the wire"))
        assert (await ended(a)).code == ErrorCode.BAD_SESSION_FRAME
        seen = [await expect(b, Deliver)] + await barrier(b)
        assert delivers(seen) == [twice]
        b.send(Received(twice))
        proxy.edit = lambda pipe, d, i, raw: raw
        # Replay A's HELLO while A is online: A keeps its session, nothing is lost.
        a = await live.login(A)
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as zombie:
            zombie.sendall(hello)
            (welcome,) = FrameDecoder(1 << 20).feed(zombie.recv(4096))  # HELLO was read
            assert welcome.type is FrameType.WELCOME
            meanwhile = os.urandom(16)
            b.send(Send(meanwhile, A, b"while the replay waits"))
            got = await expect(a, Deliver)
            assert got.msg_id == meanwhile
            a.send(Received(meanwhile))
            await expect(b, Delivered, where=lambda m: m.msg_id == meanwhile)
            assert not a.closed.called
        assert meanwhile not in delivers(await barrier(a))
        await a.disconnect()
    finally:
        await b.disconnect()
        await proxy.close()
    await live.check()
    live.stop()


def _seq(raw: bytes) -> int:
    return int(struct.unpack_from(">Q", raw, 6)[0])


@pytest_twisted.ensureDeferred
async def test_frames_from_another_session_are_refused(tmp_path: Path) -> None:
    """The attacker takes a sealed frame of A's session, with the very sequence
    number B's session expects next, and injects it into B's connection, toward
    the daemon and toward B's client.  Both refuse it (the keys differ per
    session): B's session ends, nothing of A's reaches B, and a message to B
    sent afterwards is delivered once when B is back."""
    live = await Live(tmp_path).start()
    proxy = Proxy(live.port)
    await proxy.listen()
    try:
        a = await live.login(A, port=proxy.port)
        b = await live.login(B, port=proxy.port)
        pa, pb = proxy.pipes
        await expect(a, Directory)
        await expect(b, Directory)
        await live.exchange(a, b)
        # Toward the daemon: A's first SEALED (seq 0) into B's stream (B sent nothing yet).
        pb.inject(C2S, pa.frames[C2S][1])
        assert (await ended(b)).code == ErrorCode.BAD_SESSION_FRAME
        b = await live.login(B, port=proxy.port)
        pb = proxy.pipes[-1]
        await expect(b, Directory)
        # Toward B's client: a frame the daemon sealed for A, with the seq B expects.
        wanted = sum(1 for raw in pb.frames[S2C] if raw[5] == FrameType.SEALED)
        nonce = 0
        while not [r for r in pa.frames[S2C] if r[5] == FrameType.SEALED and _seq(r) == wanted]:
            nonce += 1
            a.send(Ping(nonce))
            await expect(a, Pong)
        (foreign,) = [r for r in pa.frames[S2C] if r[5] == FrameType.SEALED and _seq(r) == wanted]
        pb.inject(S2C, foreign)
        assert (await ended(b)).code == ErrorCode.BAD_SESSION_FRAME
        assert b.inbox.pending == []
        later = os.urandom(16)
        a.send(Send(later, B, b"after the injection"))
        await expect(a, Accepted)
        b = await live.login(B)
        assert (await expect(b, Deliver)).msg_id == later
        b.send(Received(later))
        assert later not in delivers(await barrier(b))
        await a.disconnect()
        await b.disconnect()
    finally:
        await proxy.close()
    await live.check()
    live.stop()


def cut_half_way(direction: str, index: int) -> Edit:
    def edit(pipe: Pipe, d: str, i: int, raw: bytes) -> bytes:
        if (d, i) == (direction, index):
            pipe.inject(d, raw[: len(raw) // 2])
            pipe.cut()
            return b""
        return raw

    return edit


@pytest_twisted.ensureDeferred
async def test_truncated_streams(tmp_path: Path) -> None:
    """The attacker cuts a stream in the middle of a frame: half a HELLO, half of
    A's SEND, half of the DELIVER to B.  The daemon drops the partial frame and
    acts on nothing in it; the SEND is not ACCEPTED (the client resends it); the
    DELIVER stays the daemon's duty (it is stored, then ACCEPTED) and reaches B
    exactly once after B reconnects."""
    live = await Live(tmp_path, "--handshake-timeout=2").start()
    hello_half = struct.pack(">I", 90) + b"\x01\x01" + os.urandom(40)
    assert raw_exchange(live.port, hello_half) == b""  # EOF mid-frame: dropped quietly
    # Left open, it is timed out: that takes the handshake timeout, so it runs
    # in a thread alongside the rest (from its own address: not rate limited).
    silent = threads.deferToThread(
        raw_exchange, live.port, hello_half, half_close=False, source="127.0.0.3"
    )
    proxy = Proxy(live.port, cut_half_way(C2S, 1))
    await proxy.listen()
    try:
        a = await live.login(A, port=proxy.port)
        b = await live.login(B)
        lost_send = Send(os.urandom(16), B, b"cut on the way in")
        a.send(lost_send)
        assert (await ended(a)).code is None
        assert not [m for m in a.inbox.pending if isinstance(m, Accepted)]
        assert delivers(await quiet(b, 0.5)) == []
        a = await live.login(A)
        a.send(lost_send)  # from the outbox: never ACCEPTED, so sent again
        await expect(b, Deliver, where=lambda m: m.msg_id == lost_send.msg_id)
        b.send(Received(lost_send.msg_id))
        await expect(a, Delivered, where=lambda m: m.msg_id == lost_send.msg_id)
        await b.disconnect()
        # Cut the DELIVER to B half way: the daemon keeps the message.
        proxy.edit = cut_half_way(S2C, 2)  # WELCOME, DIRECTORY, then the DELIVER
        b = await live.login(B, port=proxy.port)
        await expect(b, Directory)
        cut = os.urandom(16)
        a.send(Send(cut, B, b"cut on the way out"))
        assert (await ended(b)).code is None
        assert b.inbox.pending == []
        await expect(a, Accepted, where=lambda m: m.msg_id == cut)  # stored once B was gone
        b = await live.login(B)
        assert (await expect(b, Deliver)).msg_id == cut
        b.send(Received(cut))
        await expect(a, Delivered, where=lambda m: m.msg_id == cut)
        assert cut not in delivers(await barrier(b))
        await a.disconnect()
        await b.disconnect()
    finally:
        await proxy.close()
    assert error_code(await silent) == ErrorCode.HANDSHAKE_TIMEOUT
    await live.check()
    live.stop()


def _sealed(frames: list[bytes]) -> list[bytes]:
    return [raw for raw in frames if raw[5] == FrameType.SEALED]


@pytest_twisted.ensureDeferred
async def test_reflected_session_frames_are_refused(tmp_path: Path) -> None:
    """The attacker sends a party's own frames back to it: the client's HELLO back
    to the client, the client's SEALED frame back to the client, and the daemon's
    SEALED frame back to the daemon, each with the very sequence number the
    receiver expects next.  Each direction has its own keys, so each is refused
    (the connection ends with BAD_FRAME or BAD_SESSION_FRAME) and never acted
    on: nothing reaches A's application or B."""
    live = await Live(tmp_path).start()
    proxy = Proxy(live.port)
    await proxy.listen()
    b = await live.login(B)
    try:
        # HELLO reflected to the client in place of WELCOME.
        proxy.edit = _reflect_hello
        with pytest.raises(LoginFailed) as refused:
            await live.login(A, port=proxy.port)
        assert refused.value.code == ErrorCode.BAD_FRAME
        # The client's first SEALED frame (seq 0) reflected to the client before the
        # daemon's first one (also seq 0): the client refuses it.
        proxy.edit = _reflect_first_sealed
        a = await live.login(A, port=proxy.port)
        reason = await ended(a)
        assert (reason.code, reason.text) == (ErrorCode.BAD_SESSION_FRAME, FAILED_CHECK)
        assert len(proxy.pipes[-1].frames[C2S]) == 2  # no answer to the reflected PING
        # A daemon frame reflected to the daemon with the seq the daemon expects next.
        # B's messages to A (A sends nothing back) put the daemon's seq ahead of A's.
        proxy.edit = keep_all
        a = await live.login(A, port=proxy.port)
        pipe = proxy.pipes[-1]
        await expect(a, Directory)
        for _ in range(20):
            await barrier(a)  # every frame so far has passed the proxy
            wanted = len(_sealed(pipe.frames[C2S]))
            mirror = [r for r in _sealed(pipe.frames[S2C]) if _seq(r) == wanted]
            if mirror:
                break
            b.send(Send(os.urandom(16), A, b"to A"))
            await expect(a, Deliver)
        pipe.inject(C2S, mirror[0])
        reason = await ended(a)
        assert (reason.code, reason.text) == (ErrorCode.BAD_SESSION_FRAME, FAILED_CHECK)
        assert len(_sealed(pipe.frames[C2S])) == wanted  # A itself sent nothing more
        assert delivers(await barrier(b)) == []
    finally:
        await b.disconnect()
        await proxy.close()
    log = live.log_text()
    assert "BAD_SESSION_FRAME" in log
    await live.check()
    live.stop()


def keep_all(pipe: Pipe, direction: str, index: int, raw: bytes) -> bytes:
    return raw


def _reflect_hello(pipe: Pipe, direction: str, index: int, raw: bytes) -> bytes:
    if (direction, index) == (C2S, 0):
        pipe.inject(S2C, raw)  # the client's HELLO back to it
        return b""
    return raw


def _reflect_first_sealed(pipe: Pipe, direction: str, index: int, raw: bytes) -> bytes:
    if (direction, index) == (C2S, 1):
        pipe.inject(S2C, raw)  # seq 0, sealed by the client: back to the client
        return b""
    return raw


@pytest_twisted.ensureDeferred
async def test_frames_from_an_earlier_session_of_the_same_user_are_refused(
    tmp_path: Path,
) -> None:
    """The attacker records A's first session and, once A has logged in again (same
    user, same K_u), injects frames of the first session with the sequence number
    the second expects next: A's old frame toward the daemon, and the daemon's old
    frame to A toward A.  Every session has fresh keys, so both are refused, the
    second session ends, and nothing in them is acted on: the message A sent in
    the first session reaches B once."""
    live = await Live(tmp_path).start()
    proxy = Proxy(live.port)
    await proxy.listen()
    try:
        b = await live.login(B)
        a = await live.login(A, port=proxy.port)
        await expect(a, Directory)
        first = await live.exchange(a, b, b"once, in the first session")
        for nonce in range(1, 6):  # a few more frames both ways to choose from
            a.send(Ping(nonce))
            await expect(a, Pong)
        await a.disconnect()
        old = proxy.pipes[-1]
        # Toward the daemon: the old frame with the seq the new session expects.
        a = await live.login(A, port=proxy.port)
        new = proxy.pipes[-1]
        await expect(a, Directory)
        await barrier(a)  # every frame of the login has passed the proxy
        (stale,) = [r for r in _sealed(old.frames[C2S]) if _seq(r) == len(_sealed(new.frames[C2S]))]
        new.inject(C2S, stale)
        reason = await ended(a)
        assert (reason.code, reason.text) == (ErrorCode.BAD_SESSION_FRAME, FAILED_CHECK)
        # Toward A: the daemon's old frame with the seq A's client expects next.
        a = await live.login(A, port=proxy.port)
        new = proxy.pipes[-1]
        await expect(a, Directory)
        await barrier(a)  # every frame of the login has passed the proxy
        (stale,) = [r for r in _sealed(old.frames[S2C]) if _seq(r) == len(_sealed(new.frames[S2C]))]
        new.inject(S2C, stale)
        reason = await ended(a)
        assert (reason.code, reason.text) == (ErrorCode.BAD_SESSION_FRAME, FAILED_CHECK)
        assert a.inbox.pending == []
        assert first not in delivers(await barrier(b))
        await b.disconnect()
    finally:
        await proxy.close()
    await live.check()
    live.stop()
