"""Per-source limits where one address is many users (from the review of
2026-12-07): a UNIX-socket listener, whose peers have no address, and an
office behind one NAT whose users each lose their network once.
"""

from __future__ import annotations

from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport

from enclaves.crypto import KeyPair
from enclaves.frames import MAX_FRAME, ErrorCode, FrameDecoder
from enclaves.handshake import ClientHandshake
from enclaves.inner import Directory
from enclaves.server.protocol import HANDSHAKES_PER_ADDRESS_TEXT
from tests.server.harness import Harness, RawClient

A = 11


# -- (3): a UNIX-socket listener is one source -----------------------------------------


class UnixClient(RawClient):
    """A RawClient whose connection comes in over a UNIX socket (a proxy's)."""

    def __init__(self, harness: Harness, user_id: int, keys: KeyPair) -> None:
        self.harness = harness
        addr = UNIXAddress(None)
        self.proto = harness.factory.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)
        self.handshake = ClientHandshake(user_id, keys)
        self.decoder = FrameDecoder(MAX_FRAME)
        self.session = None
        self.lost = False


def test_one_silent_peer_behind_a_unix_listener_does_not_hold_everyones_logins() -> None:
    """32 silent connections through the proxy (one unauthenticated attacker
    anywhere on the Internet) and the next user behind the same proxy cannot
    log in; their timeouts then block every login for up to 5 minutes."""
    h = Harness()
    ka = h.add_user(A)
    _silent = [UnixClient(h, 99, KeyPair.generate()) for _ in range(32)]
    honest = UnixClient(h, A, ka)
    assert not honest.closing, honest.outer_error()
    assert honest.login() == [Directory((A,))]


def test_six_bad_hellos_behind_a_unix_listener_do_not_lock_everyone_out() -> None:
    h = Harness()
    ka = h.add_user(A)
    for _ in range(6):
        bad = UnixClient(h, A, KeyPair.generate())
        bad.write(bad.handshake.hello_frame())  # AUTH_FAILED: a failed handshake
        bad.lose()
    honest = UnixClient(h, A, ka)
    assert not honest.closing, honest.outer_error()
    assert honest.login() == [Directory((A,))]


# -- (3): honest failures on one shared address -----------------------------------------


def test_one_cut_login_per_user_does_not_block_an_office_nat() -> None:
    """Users behind one NAT; over an afternoon 14 of them each lose their
    network once in the middle of a login, ten minutes apart (the "one
    failed login per network failure" the docs call normal use), with good
    logins in between.  The count never decays while failures come less
    than 15 minutes apart, and good logins do not lower it: from the sixth
    cut on, each one blocks the whole office, for 1, 2, 4, ... then 300 s."""
    h = Harness()
    office = "192.0.2.50"
    waits = []
    for uid in range(100, 114):
        k = h.add_user(uid)
        for _ in range(3):  # good logins
            ok = h.raw(uid, k, host=office)
            assert not ok.closing
            ok.login()
            ok.lose()
        cut = h.raw(uid, k, host=office)
        cut.welcome()
        cut.lose()  # Wi-Fi gone just after WELCOME
        waits.append(h.factory.limiter.blocked_for(office, h.clock.seconds()))
        if uid != 113:
            h.clock.advance(600)
    late = h.raw(999, h.add_user(999), host=office)  # right after the 14th cut
    assert waits == [0] * 14 and not late.closing, (waits, late.outer_error())


def test_share_refusals_are_not_failed_handshakes() -> None:
    """Sanity: the refusal for the share itself is not a failure."""
    h = Harness(max_handshakes_per_address=1)
    ka = h.add_user(A)
    held = h.raw(A, ka)
    for _ in range(10):
        over = h.raw(A, ka)
        assert over.outer_error() == (ErrorCode.RATE_LIMITED, HANDSHAKES_PER_ADDRESS_TEXT)
        over.lose()
    held.lose()
    assert h.factory.limiter.blocked_for("192.0.2.1", h.clock.seconds()) == 0


def test_a_share_of_zero_turns_the_share_off() -> None:
    """--max-handshakes-per-address 0: behind a TCP proxy every client comes
    from its address, and the admin can turn the share off."""
    h = Harness(max_handshakes_per_address=0)
    ka = h.add_user(A)
    _silent = [h.raw(99, KeyPair.generate()) for _ in range(100)]
    honest = h.raw(A, ka)
    assert not honest.closing, honest.outer_error()
    assert honest.login() == [Directory((A,))]
