"""Connections that never log in (docs/protocol.rst, "Limits"): what counts as a
failed handshake, and each address's share of connections not logged in yet;
over the deterministic harness (StringTransport, task.Clock)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode, FrameType, encode_error, encode_frame
from enclaves.inner import Directory, Error, Ping
from enclaves.server.protocol import (
    DEFAULT_MAX_CONNECTIONS,
    HANDSHAKES_PER_ADDRESS_TEXT,
    default_handshakes_per_address,
)
from tests.server.harness import Harness, RawClient

A, B = 11, 22
ATTACKER = "198.51.100.7"
ELSEWHERE = "203.0.113.9"
FREE = 5  # FailureLimiter's default: failures before any backoff


@pytest.fixture
def h() -> Harness:
    return Harness()


def _outer_code(client: RawClient) -> int:
    return client.outer_error()[0]


def _sealed_codes(client: RawClient) -> list[int]:
    return [m.code for m in client.received() if isinstance(m, Error)]


def test_handshake_timeouts_count_as_failed_handshakes() -> None:
    """Six connections that time out, three before and three after WELCOME:
    the seventh from that address is refused RATE_LIMITED; others are not."""
    h = Harness(handshake_timeout=10)
    ka = h.add_user(A)
    for n in range(FREE + 1):
        c = h.raw(A, ka, host=ATTACKER)
        if n % 2:
            c.welcome()  # WELCOME, then never a SEALED frame
        h.clock.advance(10)
        if n % 2:
            assert _sealed_codes(c) == [ErrorCode.HANDSHAKE_TIMEOUT]
        else:
            assert _outer_code(c) == ErrorCode.HANDSHAKE_TIMEOUT
        c.lose()
    assert _outer_code(h.raw(A, ka, host=ATTACKER)) == ErrorCode.RATE_LIMITED
    assert h.raw(A, ka, host=ELSEWHERE).login() == [Directory((A,))]


def test_replayed_hello_then_close_is_rate_limited(h: Harness) -> None:
    """A captured HELLO replayed over and over (each costs the server an X25519
    and an HKDF): WELCOME, then the replayer closes, or sends anything but a
    SEALED frame that opens.  Each round is a failed handshake, so after the
    free ones the address is refused before the HELLO is read; the user
    logs in from elsewhere, and from that address once the backoff is over."""
    ka = h.add_user(A)
    hello = h.raw(A, ka, host=ELSEWHERE).handshake.hello_frame()  # "captured"
    endings = [
        lambda c: None,  # just close
        lambda c: c.write(encode_frame(FrameType.ERROR, encode_error(ErrorCode.BAD_FRAME, "x"))),
        lambda c: c.write(hello),  # a second HELLO: BAD_FRAME
        lambda c: c.write(encode_frame(FrameType.SEALED, bytes(56))),  # does not open
        lambda c: None,
        lambda c: None,
    ]
    for ending in endings:
        replayer = h.raw(A, ka, host=ATTACKER)
        replayer.write(hello)
        assert [f.type for f in replayer.frames()] == [FrameType.WELCOME]
        ending(replayer)
        replayer.lose()
    refused = h.raw(A, ka, host=ATTACKER)
    refused.write(hello)
    code, text = refused.outer_error()
    assert code == ErrorCode.RATE_LIMITED and "retry in" in text
    assert not h.router.is_online(A)
    assert h.raw(A, ka, host=ELSEWHERE).login() == [Directory((A,))]
    h.clock.advance(2)  # the sixth failure blocks for 1 s
    assert h.raw(A, ka, host=ATTACKER).login() == [Directory((A,))]


def test_a_hello_abandoned_during_the_user_lookup_counts(h: Harness) -> None:
    """Gone while the server still looks the user up: the lookup's answer is
    dropped, and the abandoned handshake still counts."""
    h.add_user(A)
    h.storage.load_user = lambda user_id: Deferred()  # type: ignore[method-assign]
    for _ in range(FREE + 1):
        c = h.raw(A, KeyPair.generate(), host=ATTACKER)
        c.write(c.handshake.hello_frame())
        c.lose()
    assert _outer_code(h.raw(A, KeyPair.generate(), host=ATTACKER)) == ErrorCode.RATE_LIMITED


def test_an_honest_client_that_loses_its_network_is_not_locked_out(h: Harness) -> None:
    """Up to five handshakes cut off (after HELLO or WELCOME, or timed out) cost
    nothing; connections closed before sending a byte (port probes, load
    balancer checks) never count, nor do refusals of the server's own
    (shutting down, an expired token)."""
    ka, kb = h.add_user(A), h.add_user(B, enrolling_for=-1)
    for _ in range(20):
        h.raw(A, ka).lose()  # a probe: connect, close
    cut = h.raw(A, ka)
    cut.welcome()
    cut.lose()  # the network went, just after WELCOME
    timed_out = h.raw(A, ka)
    timed_out.write(timed_out.handshake.hello_frame()[:10])
    h.clock.advance(h.factory.handshake_timeout)
    assert _outer_code(timed_out) == ErrorCode.HANDSHAKE_TIMEOUT
    expired = h.raw(B, kb)
    expired.write(expired.handshake.hello_frame())
    assert _outer_code(expired) == ErrorCode.TOKEN_EXPIRED
    stopping = h.raw(A, ka)
    stopping.welcome()
    h.factory.disconnect_all()
    assert _sealed_codes(stopping) == [ErrorCode.SHUTTING_DOWN]
    for _ in range(FREE - 2):
        again = h.raw(A, ka)
        again.welcome()
        again.lose()
    assert h.factory.limiter.blocked_for("192.0.2.1", h.clock.seconds()) == 0
    assert h.raw(A, ka).login() == [Directory((A,))]


def test_the_start_of_a_backoff_is_logged_once(h: Harness) -> None:
    """Eight handshakes fail at once (all opened before the first failed): the
    sixth starts the backoff and is logged, the next two only extend it."""
    clients = [h.raw(A, KeyPair.generate(), host=ATTACKER) for _ in range(FREE + 3)]
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for c in clients:
            c.write(c.handshake.hello_frame())
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if "too many failed" in e.get("log_format", "")]
    assert lines == [
        f"too many failed handshakes from {ATTACKER}: refusing its connections for 1.0 s"
    ]
    assert h.factory.limiter.blocked_for(ATTACKER, h.clock.seconds()) == 4


# -- the share of handshakes per address ----------------------------------------------


def _refused_for_its_share(client: RawClient) -> bool:
    return client.outer_error() == (ErrorCode.RATE_LIMITED, HANDSHAKES_PER_ADDRESS_TEXT)


def test_the_default_share_is_32_or_a_quarter_of_the_connections() -> None:
    assert default_handshakes_per_address(DEFAULT_MAX_CONNECTIONS) == 32
    assert default_handshakes_per_address(40) == 10
    assert default_handshakes_per_address(2) == 1
    assert Harness().factory.max_handshakes_per_address == 32
    assert Harness(max_connections=40).factory.max_handshakes_per_address == 10
    assert Harness(max_handshakes_per_address=7).factory.max_handshakes_per_address == 7


def test_one_address_cannot_hold_the_slots_with_connections_that_never_log_in() -> None:
    """--max-connections=40: one address holds at most 10 connections that are
    not logged in — silent, mid-HELLO, waiting for the user lookup, or past
    WELCOME — and the eleventh is refused RATE_LIMITED at once, which is not a
    failed handshake.  Everyone else still gets in; and the address itself
    again once its connections have gone."""
    h = Harness(max_connections=40)
    ka = h.add_user(A)
    held = [h.raw(A, ka, host=ATTACKER) for _ in range(7)]  # silent
    held[0].write(held[0].handshake.hello_frame()[:20])  # mid-HELLO
    waiting = Deferred[None]()
    h.storage.load_user = lambda user_id: waiting  # type: ignore[method-assign]
    for _ in range(2):
        looking_up = h.raw(A, ka, host=ATTACKER)
        looking_up.write(looking_up.handshake.hello_frame())
        held.append(looking_up)
    del h.storage.load_user
    proving = h.raw(A, ka, host=ATTACKER)
    proving.welcome()  # a replayed HELLO would get this far
    held.append(proving)
    assert len(held) == 10 and not any(c.closing for c in held)
    for _ in range(3):
        over = h.raw(A, ka, host=ATTACKER)
        assert _refused_for_its_share(over)
        over.lose()
    assert h.factory.limiter.blocked_for(ATTACKER, h.clock.seconds()) == 0
    assert len(h.factory.protocols) == 10  # the refused hold no slot
    assert h.raw(A, ka, host=ELSEWHERE).login() == [Directory((A,))]
    for c in held[:FREE]:
        c.lose()
    assert h.raw(A, ka, host=ATTACKER).login()[:1] == [Directory((A,))]
    for c in held[FREE:]:
        c.lose()
    assert h.factory.handshaking == {}  # the table keeps no address with none


def test_many_users_behind_one_nat_log_in_and_stay_online() -> None:
    """Live sessions do not count against the share: 60 users behind one
    address (an office NAT) are all online together, with a share of 4; a
    fifth connection still logging in at once is refused, and gets in once
    one of the four has logged in."""
    h = Harness(max_handshakes_per_address=4)
    office = "192.0.2.50"
    keys = {uid: h.add_user(uid) for uid in range(100, 160)}
    for uid, k in keys.items():
        h.raw(uid, k, host=office).login()
    assert h.router.online_users() == sorted(keys)
    late = {uid: h.add_user(uid) for uid in range(200, 205)}
    arriving = [h.raw(uid, k, host=office) for uid, k in list(late.items())[:4]]
    for c in arriving[:2]:
        c.welcome()
    fifth = h.raw(204, late[204], host=office)
    assert _refused_for_its_share(fifth)
    fifth.lose()
    arriving[0].send(Ping(1))  # now live: its place is free
    everyone = Directory(tuple(sorted([*keys, *late])))
    assert h.raw(204, late[204], host=office).login() == [everyone]
    assert len(h.router.online_users()) == 62


def test_an_ipv6_64_shares_one_share_and_ipv4_mapped_is_ipv4() -> None:
    """IPv6 is counted per /64 (one subscriber usually holds a whole /64, so
    per address would be no limit), like the failed-handshake backoff; an
    IPv4-mapped IPv6 address counts as its IPv4 address."""
    h = Harness(max_handshakes_per_address=2)
    ka = h.add_user(A)
    h.raw(A, ka, host="2001:db8:0:1::1"), h.raw(A, ka, host="2001:db8:0:1:ffff::2")
    assert _refused_for_its_share(h.raw(A, ka, host="2001:db8:0:1:1234:5678:9abc:def0"))
    assert h.raw(A, ka, host="2001:db8:0:2::1").login() == [Directory((A,))]
    h.raw(A, ka, host="192.0.2.9"), h.raw(A, ka, host="192.0.2.9")
    assert _refused_for_its_share(h.raw(A, ka, host="::ffff:192.0.2.9"))
    assert h.factory.handshaking == {"2001:db8:0:1::/64": 2, "192.0.2.9": 2}


def test_refused_connections_are_counted_for_the_admin() -> None:
    """stats() counts each kind of refusal at connection time (the admin
    shell's "connections refused")."""
    h = Harness(max_connections=4, max_handshakes_per_address=2)
    held = [h.raw(A, KeyPair.generate(), host=ATTACKER) for _ in range(2)]
    over = h.raw(A, KeyPair.generate(), host=ATTACKER)
    assert _refused_for_its_share(over)
    over.lose()
    for _ in range(FREE + 1):
        bad = h.raw(A, KeyPair.generate(), host=ELSEWHERE)
        bad.write(bad.handshake.hello_frame())
        bad.lose()
    blocked = h.raw(A, KeyPair.generate(), host=ELSEWHERE)
    assert _outer_code(blocked) == ErrorCode.RATE_LIMITED
    blocked.lose()
    held += [h.raw(A, KeyPair.generate(), host="192.0.2.77") for _ in range(2)]
    busy = h.raw(A, KeyPair.generate(), host="192.0.2.78")
    assert _outer_code(busy) == ErrorCode.SERVER_BUSY
    busy.lose()
    stats = h.router.stats()
    assert (stats.refused_busy, stats.refused_backoff, stats.refused_share) == (1, 1, 1)
    assert stats.connections == 4 and not any(c.closing for c in held)
