"""Many connections at once: slowloris, idle sockets, a handshake flood, random
garbage, all from loopback.

Every loop here is bounded in count and time.  The failed-handshake limiter
and the share of handshakes are per source address and the attacking sockets
come from 127.0.0.1 (the slowloris from several 127.0.3.x), so the honest pair
logs in from 127.0.0.2 (Linux routes all of 127/8 to lo): a different
address, as an honest user elsewhere on the Internet would have.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from enclaves.client.connection import LoginFailed
from enclaves.frames import ErrorCode, FrameDecoder, FrameError, FrameType, decode_error
from enclaves.handshake import HELLO_SIZE
from tests.adversarial.live import A, B, Live

pytestmark = pytest.mark.system

HONEST = "127.0.0.2"


class Attacker(Protocol):
    """Writes ``first`` at once, then ``dribble`` one byte per ``every`` seconds."""

    def __init__(self, first: bytes = b"", dribble: bytes = b"", every: float = 0.2) -> None:
        self.first, self.dribble, self.every = first, dribble, every
        self.received = b""
        self.opened = 0.0
        self.closed: Deferred[float] = Deferred()
        self._loop: LoopingCall | None = None

    def connectionMade(self) -> None:
        self.opened = time.monotonic()
        assert self.transport is not None
        if self.first:
            self.transport.write(self.first)
        if self.dribble:
            self._loop = LoopingCall(self._drip)
            self._loop.clock = reactor
            self._loop.start(self.every, now=False)

    def _drip(self) -> None:
        if self.dribble and self.transport is not None:
            self.transport.write(self.dribble[:1])
            self.dribble = self.dribble[1:]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.closed.callback(time.monotonic() - self.opened)

    def error_codes(self) -> list[int]:
        frames = FrameDecoder(1 << 20).feed(self.received)
        assert all(f.type is FrameType.ERROR for f in frames), frames
        return [decode_error(f.payload)[0] for f in frames]


async def attack(
    port: int, count: int, make: type[Attacker] | object, source: str = "127.0.0.1"
) -> list[Attacker]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    attackers = [make() for _ in range(count)]  # type: ignore[operator]
    await gatherResults([connectProtocol(endpoint, a) for a in attackers])
    return attackers


def bad_hello() -> bytes:
    """A HELLO of the right size for a random (or an existing) user, random tag."""
    user = (A, B, int.from_bytes(os.urandom(8), "big") or 1)[os.urandom(1)[0] % 3]
    payload = struct.pack(">Q", user) + os.urandom(HELLO_SIZE - 8)
    return struct.pack(">I", HELLO_SIZE + 2) + bytes([1, FrameType.HELLO]) + payload


@pytest_twisted.ensureDeferred
async def test_slowloris_is_reaped_by_the_handshake_timeout(tmp_path: Path) -> None:
    """An attacker with several addresses opens more sockets than there are
    connection slots, each dribbling a HELLO one byte every 0.2 s, no more
    from one address than its share of handshakes (a quarter of the slots).
    Those beyond the limit get SERVER_BUSY at once; while the rest hold the
    slots an honest login gets SERVER_BUSY (the accepted cost); dribbling does
    not extend the deadline, so within the handshake timeout every one is
    told HANDSHAKE_TIMEOUT and closed, and honest users connect and chat again."""
    slots, extra, timeout = 40, 10, 5
    share = slots // 4  # the default share of handshakes per address
    live = await Live(
        tmp_path, f"--max-connections={slots}", f"--handshake-timeout={timeout}"
    ).start()
    started = time.monotonic()
    sources = iter(f"127.0.3.{n}" for n in range(1, 200))
    dribblers = []
    for _ in range((slots + extra) // share):
        dribblers += await attack(
            live.port, share, lambda: Attacker(dribble=bad_hello()), next(sources)
        )
    # Those beyond the limit are refused at once.  (A connection of our own
    # closing at the same moment can make one more refused: top up until
    # every slot is held.)
    for _ in range(10):
        closed = -1
        while closed != sum(d.closed.called for d in dribblers):
            closed = sum(d.closed.called for d in dribblers)
            await deferLater(reactor, 0.2)
        if len(dribblers) - closed >= slots:
            break
        more = slots - (len(dribblers) - closed)
        dribblers += await attack(
            live.port, more, lambda: Attacker(dribble=bad_hello()), next(sources)
        )
    probed = time.monotonic() - started
    with pytest.raises(LoginFailed) as busy:
        await live.login(A, bind=HONEST)
    assert busy.value.code == ErrorCode.SERVER_BUSY, probed
    held = [await d.closed.addTimeout(timeout + 5, reactor) for d in dribblers]
    assert max(held) < timeout + 2, held
    assert time.monotonic() - started < timeout + 5
    codes = [d.error_codes() for d in dribblers]
    timed_out = codes.count([ErrorCode.HANDSHAKE_TIMEOUT])
    assert timed_out >= slots and timed_out + codes.count([ErrorCode.SERVER_BUSY]) == len(codes)
    await live.check(bind=HONEST)
    live.stop()


async def _settled(attackers: list[Attacker]) -> list[Attacker]:
    """Those still open once refusals (which come at once) stop arriving."""
    closed = -1
    while closed != sum(a.closed.called for a in attackers):
        closed = sum(a.closed.called for a in attackers)
        await deferLater(reactor, 0.3)
    return [a for a in attackers if not a.closed.called]


@pytest_twisted.ensureDeferred
async def test_idle_connections_from_one_address_cannot_fill_the_server(tmp_path: Path) -> None:
    """With --max-connections=40 the attacker opens 45 sockets from 127.0.0.1
    and never sends a byte (a slowloris of idle sockets).  One address may
    hold only its share of connections not logged in (a quarter of the
    slots, 10): the other 35 are refused RATE_LIMITED at once.  While the 10
    are held, the honest pair from 127.0.0.2 logs in and chats — before, the
    45 filled the server and every other user got SERVER_BUSY.  The 10 then
    time out, HANDSHAKE_TIMEOUT, and those timeouts are failed handshakes:
    127.0.0.1 is then refused at connection time, told how long to wait."""
    slots, sockets, timeout = 40, 45, 5
    share = slots // 4
    live = await Live(
        tmp_path, f"--max-connections={slots}", f"--handshake-timeout={timeout}"
    ).start()
    idle = await attack(live.port, sockets, Attacker)
    held = await _settled(idle)
    # The start-up probe's connection may still have held a place: top up.
    for _ in range(5):
        if len(held) >= share:
            break
        idle += await attack(live.port, share - len(held), Attacker)
        held = await _settled(idle)
    assert len(held) == share, (len(held), [a.error_codes() for a in idle])
    refused = [a.error_codes() for a in idle if a.closed.called]
    assert len(refused) >= sockets - share
    assert refused == [[ErrorCode.RATE_LIMITED]] * len(refused)
    await live.check(bind=HONEST)  # while the attacker's 10 are still held
    assert not any(a.closed.called for a in held)
    await gatherResults([a.closed for a in held]).addTimeout(timeout + 5, reactor)
    assert [a.error_codes() for a in held] == [[ErrorCode.HANDSHAKE_TIMEOUT]] * share
    with pytest.raises(LoginFailed) as backing_off:
        await live.login(A)
    assert backing_off.value.code == ErrorCode.RATE_LIMITED
    assert "failed handshakes" in backing_off.value.text
    log = live.log_text()
    assert "too many failed handshakes from 127.0.0.1: refusing its connections" in log
    assert "RATE_LIMITED too many connections from your address are logging in" in log
    live.stop()


@pytest_twisted.ensureDeferred
async def test_handshake_flood_from_one_address(tmp_path: Path) -> None:
    """The attacker opens 300 sockets at once from 127.0.0.1, each with a HELLO that
    fails (random ids and tags, some for real users).  Each is answered
    AUTH_FAILED or, once the address is blocked or over its share of
    handshakes, RATE_LIMITED at once, and closed; none hangs.  Once the
    address is blocked, a second wave of 50 is refused RATE_LIMITED before
    any HELLO is read.  Honest users elsewhere
    (127.0.0.2) log in and chat; the real user A is not locked out.  Only
    127.0.0.1 itself must wait: an honest user sharing the attacker's address
    is rate limited too."""
    live = await Live(tmp_path).start()
    started = time.monotonic()
    flood = await attack(live.port, 300, lambda: Attacker(first=bad_hello()))
    await gatherResults([f.closed for f in flood]).addTimeout(30, reactor)
    assert time.monotonic() - started < 30
    codes = [code for f in flood for code in f.error_codes()]
    assert len(codes) == len(flood)
    assert set(codes) <= {ErrorCode.AUTH_FAILED, ErrorCode.RATE_LIMITED}, set(codes)
    # Now the address is blocked: a second wave is refused at connection time.
    wave = await attack(live.port, 50, lambda: Attacker(first=bad_hello()))
    await gatherResults([f.closed for f in wave]).addTimeout(30, reactor)
    assert [f.error_codes() for f in wave] == [[ErrorCode.RATE_LIMITED]] * 50
    await live.check(bind=HONEST)
    with pytest.raises(LoginFailed) as limited:
        await live.login(A)
    assert limited.value.code == ErrorCode.RATE_LIMITED
    live.stop()


def _frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 2) + bytes([1, kind]) + body


GARBAGE = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.builds(_frame, st.sampled_from([0, 1, 2, 3, 0x10, 0x11, 0xFF]), st.binary(max_size=120)),
        st.builds(lambda n: struct.pack(">I", n), st.integers(0, 2**32 - 1)),
        st.builds(lambda: bad_hello()),
    ),
    min_size=1,
    max_size=5,
)
ANSWERS = {
    ErrorCode.BAD_FRAME,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.AUTH_FAILED,
    ErrorCode.RATE_LIMITED,
    ErrorCode.HANDSHAKE_TIMEOUT,
}


def _throw(port: int, chunks: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the daemon may already have refused and closed
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    try:
        frames = FrameDecoder(1 << 20).feed(reply)
    except FrameError as error:
        raise AssertionError(f"the daemon sent malformed bytes: {reply!r}") from error
    for frame in frames:
        assert frame.type is FrameType.ERROR, frame
        assert decode_error(frame.payload)[0] in ANSWERS


@pytest_twisted.ensureDeferred
async def test_random_garbage_against_a_live_daemon(tmp_path: Path) -> None:
    """The attacker throws hypothesis-made bytes at the daemon: random chunks,
    frames of every type with random bodies, random length prefixes, HELLOs
    with bad tags.  The daemon answers only with well-formed ERROR frames (or
    silence), never WELCOME, and serves the honest pair afterwards."""
    live = await Live(tmp_path, "--handshake-timeout=2").start()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(GARBAGE)
    def throw(chunks: list[bytes]) -> None:
        _throw(live.port, chunks)

    await deferToThread(throw)
    await deferLater(reactor, 0.1)
    await live.check(bind=HONEST)
    live.stop()
