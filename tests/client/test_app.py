"""ClientApp's connection loop on a memory reactor: backoff, jitter, fatal refusals."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from enclaves.client.app import ClientApp
from enclaves.client.contacts import ContactError
from enclaves.client.core import ClientCore, Refused, SendBlob
from enclaves.client.keystore import Keystore
from enclaves.frames import ErrorCode, FrameType, encode_error, encode_frame
from enclaves.inner import Accepted, Delivered, Directory, Error, Joined, Ping, Pong, Removed
from tests.client.helpers import Relay, make_core, saves_fail


def start(
    tmp_path: Path, core: ClientCore | None = None
) -> tuple[ClientApp, MemoryReactorClock, list[tuple[str, str]]]:
    core = core or make_core(1001)
    keystore = Keystore.create(tmp_path / "ks", "pass phrase", core.state())
    reactor = MemoryReactorClock()
    out: list[tuple[str, str]] = []
    app = ClientApp(
        reactor,
        keystore,
        core.state(),
        "tcp:host=127.0.0.1:port=7500",
        lambda tag, text: out.append((tag, text)),
        core=core,
        retry_initial=0.5,
        retry_max=4.0,
        rng=lambda: 0.5,  # no jitter: factor 0.8 + 0.4 * 0.5 = 1.0
    )
    app.start()
    return app, reactor, out


def refuse(reactor: MemoryReactorClock) -> None:
    host, port, factory, _timeout, _bind = reactor.tcpClients[-1]
    assert (host, port) == ("127.0.0.1", 7500)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def test_reconnects_with_exponential_backoff_and_says_so(tmp_path: Path) -> None:
    app, reactor, out = start(tmp_path)
    delays = []
    for attempt in range(6):
        assert len(reactor.tcpClients) == attempt + 1
        refuse(reactor)
        tag, text = out[-1]
        assert tag == "conn" and text.startswith("cannot reach the server")
        delays.append(float(text.rsplit("retrying in ", 1)[1].split()[0]))
        reactor.advance(delays[-1] - 0.01)
        assert len(reactor.tcpClients) == attempt + 1  # not before the delay
        reactor.advance(0.01)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    app.stop()
    assert app.finished.called


def test_a_rate_limited_address_waits_as_long_as_the_server_says(tmp_path: Path) -> None:
    """Trying again before "retry in N s" is refused again, and each refusal
    lengthens the wait for everyone behind the address."""
    app, reactor, out = start(tmp_path)
    _host, _port, factory, _timeout, _bind = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    protocol.makeConnection(StringTransport())
    refusal = "too many failed handshakes from your address; retry in 16 s"
    protocol.dataReceived(
        encode_frame(FrameType.ERROR, encode_error(ErrorCode.RATE_LIMITED, refusal))
    )
    protocol.connectionLost(Failure(ConnectionRefusedError()))
    tag, text = out[-1]
    assert tag == "conn" and text.endswith("retrying in 16.5 s"), text
    reactor.advance(16.4)
    assert len(reactor.tcpClients) == 1
    reactor.advance(0.2)
    assert len(reactor.tcpClients) == 2
    app.stop()


def test_jitter_stays_within_twenty_percent(tmp_path: Path) -> None:
    app, _reactor, _out = start(tmp_path)
    for r in (0.0, 1.0):
        app._rng = lambda r=r: r
        assert app._jitter(10.0) == pytest.approx(8.0 if r == 0.0 else 12.0)
    app.stop()


def test_a_refused_login_stops_for_good_with_plain_words(tmp_path: Path) -> None:
    app, reactor, _out = start(tmp_path)
    _host, _port, factory, _timeout, _bind = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        encode_frame(FrameType.ERROR, encode_error(ErrorCode.AUTH_FAILED, "authentication failed"))
    )
    protocol.connectionLost(Failure(ConnectionRefusedError()))
    assert app.finished.called
    code, text = app.outcome or (None, None)
    assert code == 1 and "does not accept this keystore's keys" in (text or "")
    reactor.advance(100)
    assert len(reactor.tcpClients) == 1  # no more attempts


def test_a_removed_user_reappearing_is_a_warning_not_a_new_contact(tmp_path: Path) -> None:
    """The server says REMOVED, then lists the same id again (JOINED, DIRECTORY,
    a DELIVER): a removed user never comes back under its id, so the client
    keeps the tombstone and warns instead of greeting a 'new' user."""
    app, _reactor, out = start(tmp_path)
    app.core.add_contact(2002)
    app._handle(Removed(2002), 0.0)
    assert out[-1] == ("removed", "2002 was removed from the server")
    out.clear()
    app._handle(Joined(2002), 0.0)
    app._handle(Directory((1001, 2002)), 0.0)
    events = app.core.handle_blob(2002, bytes(16), b"\x01" * 80, 0.0)
    for event in events:
        app._show(event)
    tags = [tag for tag, _text in out]
    assert tags == ["warn", "warn", "warn"], out
    assert all("2002" in text and "tamper" in text for _tag, text in out)
    assert app.core.contact(2002).removed
    assert [c.user_id for c in app.core.contacts()] == []
    app.stop()


def test_a_contact_missing_from_the_directory_is_unlisted_until_listed_again(
    tmp_path: Path,
) -> None:
    """REMOVED goes only to users online at the revocation; the others see the
    contact missing from the next login's DIRECTORY.  That can also be a
    server that cannot read the account (a quarantined file): the contact is
    unlisted, sending refused, nothing deleted; listed again, it works as
    before, with the same keys."""
    core = keyed_with_2002()
    core.add_contact(3003)
    keys = core.contact(2002).current
    assert keys is not None
    app, reactor, out = start(tmp_path, core)
    out.clear()
    app._handle(Directory((1001, 3003)), 0.0)
    # Not at once: what 2002 sent before it was removed comes after the list.
    assert out == [] and not app.core.contact(2002).unlisted
    for _ in range(20):
        reactor.advance(0.05)
    assert out == [
        (
            "removed",
            "2002 is no longer on the server's user list (removed, or the server cannot "
            "read their account): nothing is sent to them until it lists them again",
        )
    ]
    contact = app.core.contact(2002)
    assert contact.unlisted and not contact.removed and contact.current == keys
    assert not app.core.contact(3003).unlisted
    refused = app.core.encrypt_message(2002, "hi", 1.0, confirmed=True)
    assert isinstance(refused, Refused) and refused.reason == "unlisted"
    assert app.core.start_kex(2002, 1.0) == [] and app.core.tick(10_000.0) == []
    app._handle(Directory((1001, 3003)), 0.0)  # once only
    for _ in range(20):
        reactor.advance(0.05)
    assert len(out) == 1
    # The unlisted mark is saved with the keystore.
    reactor.advance(10)  # the save that was asked for "soon"
    _keystore, saved = Keystore.unlock(tmp_path / "ks", "pass phrase")
    assert ClientCore(saved).contact(2002).unlisted
    # Listed again (the admin restored the file): no warning, same keys, sending works.
    app._handle(Directory((1001, 2002, 3003)), 0.0)
    assert out[-1] == ("joined", "2002 is on the server's user list again")
    assert not app.core.contact(2002).unlisted and app.core.contact(2002).current == keys
    assert isinstance(app.core.encrypt_message(2002, "back", 2.0, confirmed=True), SendBlob)
    # JOINED lists it again too.
    app.core.mark_unlisted(2002)
    app._handle(Joined(2002), 0.0)
    assert out[-1] == ("joined", "2002 is on the server's user list again")
    assert not app.core.contact(2002).unlisted
    app.stop()


def test_a_contact_named_by_joined_during_the_login_burst_stays_listed(tmp_path: Path) -> None:
    """The user list leaves 2002 out, but the server names it (JOINED) before
    the login burst is over: the server lists it now, so it is not marked
    unlisted when the burst ends."""
    app, reactor, out = start(tmp_path, keyed_with_2002())
    app._handle(Directory((1001,)), 0.0)
    app._handle(Joined(2002), 0.0)
    for _ in range(20):
        reactor.advance(0.05)
    assert not app.core.contact(2002).unlisted
    assert not [text for tag, text in out if tag == "removed"]
    app.stop()


def test_a_key_exchange_refused_for_an_unknown_user_leaves_quietly(tmp_path: Path) -> None:
    """A stored OFFER from a user revoked since is answered before the user
    list is applied; the server refuses the answer (UNKNOWN_RECIPIENT): the
    answer leaves the outbox without a [failed] line or /retry advice, and a
    script does not count it."""
    a, b = make_core(1001), make_core(2002)
    relay = Relay(a, b)
    offer = b.start_kex(1001, 0.0)[0]
    events = a.handle_blob(2002, offer.msg_id, offer.blob, 0.5)
    (answer,) = [e for e in events if isinstance(e, SendBlob)]
    app, _reactor, out = start(tmp_path, a)
    out.clear()
    app._handle(Error(int(ErrorCode.UNKNOWN_RECIPIENT), answer.msg_id, "no such user"), 1.0)
    assert out == [] and app.failed_this_run == set()
    assert [e.msg_id for e in app.core.outbox()] == []
    del relay
    app.stop()


def keyed_with_2002() -> ClientCore:
    a, b = make_core(1001), make_core(2002)
    relay = Relay(a, b)
    relay.post(1001, a.start_kex(2002, 0.0))
    relay.flush(1.0)
    return a


def test_a_repeated_delivered_is_reported_once(tmp_path: Path) -> None:
    """DELIVERED may come again (a kept notice, or a stored copy delivered again
    after a server restart): "delivered" is printed when the status changes only."""
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "hello", 2.0, confirmed=True)
    core.on_accepted(sent.msg_id)
    app, _reactor, out = start(tmp_path, core)
    out.clear()
    for _ in range(3):
        app._handle(Delivered(sent.msg_id), 3.0)
    assert [tag for tag, _text in out] == ["delivered"]
    assert app.core.history(2002)[-1].status == "delivered"
    app.stop()


def test_an_error_kept_for_later_marks_the_outbox_message_failed(tmp_path: Path) -> None:
    """A per-message ERROR that was kept while the sender was offline and arrives
    at its next login marks the outbox message failed with the reason."""
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "hello", 2.0, confirmed=True)
    app, _reactor, out = start(tmp_path, core)
    out.clear()
    app._handle(Error(int(ErrorCode.QUOTA_EXCEEDED), sent.msg_id, "the queue is full"), 3.0)
    (entry,) = app.core.outbox()
    assert (entry.status, entry.reason) == (
        "failed",
        "the recipient's mailbox on the server is full",
    )
    assert app.core.history(2002)[-1].status == "failed"
    assert [tag for tag, _text in out] == ["failed"]
    assert "/retry" in out[0][1]
    app.stop()


def test_a_message_too_large_for_the_server_fails_with_its_limit_and_is_not_resent(
    tmp_path: Path,
) -> None:
    """A server's --max-frame may take less than the client sends: the refusal
    names the server's limit and this message's size, offers no /retry (the
    same blob would be refused again), and the message is not resent at the
    next login."""
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "x" * 20_000, 2.0, confirmed=True)
    app, _reactor, out = start(tmp_path, core)
    out.clear()
    text = "this server takes messages of at most 16306 bytes, encrypted"
    app._handle(Error(int(ErrorCode.MESSAGE_TOO_LARGE), sent.msg_id, text), 3.0)
    (entry,) = app.core.outbox()
    size = len(sent.blob)
    assert size > 20_000
    assert (entry.status, entry.reason) == (
        "failed",
        f"too large for this server: {text} (this one is {size} bytes)",
    )
    assert out == [
        (
            "failed",
            f"id={sent.msg_id.hex()[:8]} message to 2002 refused: too large for this server: "
            f"{text} (this one is {size} bytes); send it in shorter parts",
        )
    ]
    assert app.core.pending_sends() == []  # nothing to send again after a reconnect
    assert app.core.history(2002)[-1].status == "failed"
    app.stop()


def test_a_repeated_refusal_never_fails_a_message_accepted_since(tmp_path: Path) -> None:
    """A kept ERROR may come again (its PONG was lost); the message was retried
    and accepted meanwhile: it stays accepted. Only the ERRORs below fail an
    accepted message."""
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "hello", 2.0, confirmed=True)
    app, _reactor, out = start(tmp_path, core)
    refusal = Error(int(ErrorCode.STORAGE_FAILED), sent.msg_id, "the disk is full")
    app._handle(refusal, 3.0)
    app.core.retry(sent.msg_id)
    app.core.on_accepted(sent.msg_id)
    out.clear()
    app._handle(refusal, 4.0)
    assert app.core.history(2002)[-1].status == "accepted" and out == []
    app.stop()


@pytest.mark.parametrize(
    ("code", "why"),
    [
        # The recipient was revoked before reading it.
        (
            ErrorCode.UNKNOWN_RECIPIENT,
            "the recipient was removed from the server before reading it",
        ),
        # A copy stored by a server once run above the protocol's frame
        # limit, which it then deleted unread.
        (
            ErrorCode.MESSAGE_TOO_LARGE,
            "the server had stored it under a frame limit no client can receive, and deleted it",
        ),
    ],
)
def test_an_accepted_message_the_server_says_it_lost_fails_once(
    tmp_path: Path, code: ErrorCode, why: str
) -> None:
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "hello", 2.0, confirmed=True)
    app, _reactor, out = start(tmp_path, core)
    app.core.on_accepted(sent.msg_id)
    out.clear()
    lost = Error(int(code), sent.msg_id, "server text, not shown")
    app._handle(lost, 5.0)
    app._handle(lost, 6.0)  # once only
    assert app.core.history(2002)[-1].status == "failed"
    assert out == [
        (
            "failed",
            f"id={sent.msg_id.hex()[:8]} message to 2002 was accepted but will never be "
            f"delivered: {why}",
        )
    ]
    app.stop()


class _Conn:
    """What the app sends on a connection, with the keystore's saved status of
    ``watch`` at that moment."""

    established = True

    def __init__(self, keystore: Path, watch: bytes) -> None:
        self.keystore, self.watch = keystore, watch
        self.sent: list[tuple[object, str | None]] = []

    def send(self, message: object) -> None:
        _, state = Keystore.unlock(self.keystore, "pass phrase")
        status = next(
            (line.status for lines in state.history.values() for line in lines
             if line.msg_id == self.watch), None
        )  # fmt: skip
        self.sent.append((message, status))


def test_a_server_ping_is_answered_after_what_came_before_it_is_saved(tmp_path: Path) -> None:
    """The server deletes kept receipts when the PONG comes back: by then the
    receipt's effect must be on disk, not only in memory."""
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "hello", 2.0, confirmed=True)
    core.on_accepted(sent.msg_id)
    app, reactor, _out = start(tmp_path, core)
    conn = _Conn(tmp_path / "ks", sent.msg_id)
    deliver = app._on_message_for(conn)  # type: ignore[arg-type]
    deliver(Delivered(sent.msg_id))
    deliver(Ping(77))
    reactor.advance(0)
    assert conn.sent == [(Pong(77), "delivered")]
    app.stop()


def test_no_pong_while_what_came_before_is_only_in_memory(tmp_path: Path) -> None:
    """A failed save (for real: a file size limit) leaves a PING unanswered
    until a save succeeds, even if something else cancelled the scheduled
    save meanwhile."""
    core = keyed_with_2002()
    sent = core.encrypt_message(2002, "hello", 2.0, confirmed=True)
    core.on_accepted(sent.msg_id)
    app, reactor, _out = start(tmp_path, core)
    conn = _Conn(tmp_path / "ks", sent.msg_id)
    deliver = app._on_message_for(conn)  # type: ignore[arg-type]
    with saves_fail():
        deliver(Delivered(sent.msg_id))
        reactor.advance(0)
        app._save()  # some other direct save fails too, and cancels the scheduled one
        deliver(Ping(1))
        reactor.advance(0)
    assert conn.sent == []
    deliver(Ping(2))
    reactor.advance(0)
    assert conn.sent == [(Pong(2), "delivered")]
    app.stop()


def test_a_script_counts_messages_still_failed_not_failures_since_mended(tmp_path: Path) -> None:
    """A kept refusal arrives for a message the outbox has just resent, which is
    then accepted: it printed [failed], but is not failed at the end. A
    retried message refused again is failed at the end."""
    core = keyed_with_2002()
    mended = core.encrypt_message(2002, "mended", 2.0, confirmed=True)
    again = core.encrypt_message(2002, "again", 2.0, confirmed=True)
    app, _reactor, _out = start(tmp_path, core)
    for sent in (mended, again):
        app._handle(Error(int(ErrorCode.STORAGE_FAILED), sent.msg_id, "disk"), 3.0)
    assert app.still_failed() == 2
    app.core.retry(mended.msg_id)
    app._handle(Accepted(mended.msg_id), 4.0)
    app.core.retry(again.msg_id)
    app._handle(Error(int(ErrorCode.QUOTA_EXCEEDED), again.msg_id, "full"), 4.0)
    assert app.still_failed() == 1
    app.stop()


def test_a_cut_message_is_shown_with_a_warning(tmp_path: Path) -> None:
    """A message longer than the protocol allows is shown up to the limit,
    then a warning says how many bytes were cut."""
    from enclaves.client.contacts import Trust
    from enclaves.client.core import MAX_TEXT, MessageReceived

    app, _reactor, out = start(tmp_path, keyed_with_2002())
    out.clear()
    app._show(MessageReceived(2002, bytes(16), "x" * MAX_TEXT, 0, Trust.UNVERIFIED, 1, 12))
    assert [tag for tag, _text in out] == ["msg", "warn"]
    assert out[1][1] == (
        f"2002's message was longer than a message may be ({MAX_TEXT} bytes): "
        "its last 12 bytes were cut"
    )
    app.stop()


def test_a_message_that_cannot_be_opened_is_reported_once_in_a_while(tmp_path: Path) -> None:
    """A MESSAGE under the current epoch that does not authenticate (a keystore
    restored from an old backup, or a forgery) is not dropped in silence: one
    [warn] per contact per UNOPENED_WARN_INTERVAL, however many come."""
    from enclaves.client.app import UNOPENED_WARN_INTERVAL
    from enclaves.client.blob import BlobKind

    app, reactor, out = start(tmp_path, keyed_with_2002())
    out.clear()
    forged = bytes([BlobKind.MESSAGE]) + (1).to_bytes(4, "big") + bytes(80)
    for n in range(3):
        for event in app.core.handle_blob(2002, bytes([n]) * 16, forged, app.now()):
            app._show(event)
    assert out == [
        (
            "warn",
            "a message from 2002 could not be opened: it is not sealed under any keys this "
            "keystore has (after restoring an old backup of it, or forged); if one is "
            "missing, ask 2002 to send it again",
        )
    ]
    reactor.advance(UNOPENED_WARN_INTERVAL)
    for event in app.core.handle_blob(2002, b"\x09" * 16, forged, app.now()):
        app._show(event)
    assert len(out) == 2


@pytest.mark.parametrize(
    ("endpoint", "suffix"),
    [
        ("tcp:host=chat.example.org:port=7500", "@chat.example.org:7500"),
        ("tls:host=chat.example.org:port=7500:ca=/etc/ca.pem", "@tls:chat.example.org:7500"),
    ],
)
def test_an_invite_token_names_the_server_and_its_expiry_has_a_date(
    tmp_path: Path, endpoint: str, suffix: str
) -> None:
    """The server's INVITE token has no address: the client adds its own (as
    the admin's tokens carry it), and the expiry a day on shows its date."""
    import time

    from enclaves.crypto import KeyPair
    from enclaves.inner import InviteToken
    from enclaves.token import EnrollmentToken, parse_token

    app, _reactor, out = start(tmp_path, keyed_with_2002())
    app.endpoint = endpoint
    token = str(EnrollmentToken(4242, KeyPair.generate()))
    expires = time.mktime((2026, 11, 30, 13, 49, 40, 0, 0, -1))
    app._handle(InviteToken(4242, int(expires * 1000), token), expires - 86400)
    ((tag, text),) = out[-1:]
    assert tag == "invite"
    assert "valid until 2026-11-30 13:49 local time (UTC" in text
    shown = text.rsplit(": ", 1)[1]
    assert shown == token + suffix
    assert parse_token(shown).address == suffix[1:]
    # The reference server never names an address: one the server put in is
    # not shown as if it were this client's (the newcomer's keystore would
    # keep it), but replaced, with a warning.
    named = token + "@other.example.org:1"
    app._handle(InviteToken(4242, int(expires * 1000), named), expires - 86400)
    (warn, invite) = out[-2:]
    assert warn[0] == "warn" and "'other.example.org:1'" in warn[1]
    assert invite[0] == "invite" and invite[1].endswith(": " + token + suffix)
    # Its own address again: shown without a warning.
    before = len(out)
    app._handle(InviteToken(4242, int(expires * 1000), token + suffix), expires - 86400)
    assert [tag for tag, _text in out[before:]] == ["invite"]
    assert out[-1][1].endswith(": " + token + suffix)
    app.stop()


def test_message_lines_show_the_date_unless_today() -> None:
    import time

    from enclaves.client.app import clock_text

    noon = time.mktime((2026, 11, 29, 12, 0, 0, 0, 0, -1))
    assert clock_text(int((noon - 3600) * 1000), noon) == "11:00:00"
    assert clock_text(int((noon - 3 * 86400) * 1000), noon) == "2026-11-26 12:00:00"


def test_a_received_message_from_another_day_is_shown_with_its_date(tmp_path: Path) -> None:
    import time

    from enclaves.client.contacts import Trust
    from enclaves.client.core import MessageReceived

    app, reactor, out = start(tmp_path, keyed_with_2002())
    noon = time.mktime((2026, 11, 29, 12, 0, 0, 0, 0, -1))
    reactor.advance(noon - reactor.seconds())
    old = int((noon - 2 * 86400) * 1000)
    app._show(MessageReceived(2002, bytes(16), "old news", old, Trust.UNVERIFIED, 1, 0))
    app._show(MessageReceived(2002, bytes(16), "fresh", int(noon * 1000), Trust.UNVERIFIED, 1, 0))
    assert out[-2:] == [
        ("msg", "2026-11-27 12:00:00 2002 (unverified): old news"),
        ("msg", "12:00:00 2002 (unverified): fresh"),
    ]
    app.stop()


def test_unsent_messages_to_a_contact_unlisted_or_removed_are_reported_failed(
    tmp_path: Path,
) -> None:
    """Messages waiting in the outbox when a contact is unlisted (or removed)
    fail with a [failed] line each, count for a script, and /retry of them is
    refused until the contact is listed again."""
    core = keyed_with_2002()
    core.add_contact(3003)
    waiting = core.encrypt_message(2002, "queued", 2.0, confirmed=True)
    assert isinstance(waiting, SendBlob)
    app, reactor, out = start(tmp_path, core)
    out.clear()
    app._handle(Directory((1001, 3003)), 0.0)
    for _ in range(20):
        reactor.advance(0.05)
    sid = waiting.msg_id.hex()[:8]
    assert out[1:] == [
        (
            "failed",
            f"id={sid} message to 2002 not sent: the server no longer lists them; "
            f"/retry {sid} once they are listed again",
        )
    ]
    assert waiting.msg_id in app.failed_this_run
    assert app.core.history(2002)[-1].status == "failed"
    with pytest.raises(ContactError, match="not on the server's user list"):
        app.core.retry(waiting.msg_id)
    app._handle(Directory((1001, 2002, 3003)), 0.0)
    assert app.core.retry(waiting.msg_id).msg_id == waiting.msg_id
    # REMOVED: the same, and never retried.
    again = app.core.encrypt_message(2002, "second", 3.0, confirmed=True)
    assert isinstance(again, SendBlob)
    out.clear()
    app._handle(Removed(2002), 0.0)
    failed = [text for tag, text in out if tag == "failed"]
    assert len(failed) == 2 and all("it will never be delivered" in t for t in failed)
    with pytest.raises(ContactError, match="removed"):
        app.core.retry(again.msg_id)
    app.stop()


def test_a_failed_save_at_the_first_user_list_still_ends_the_enrollment(tmp_path: Path) -> None:
    """The first user list after the rotation starts the key exchanges; if the
    keystore cannot be saved then, the offers wait in memory for a save (not
    sent unsaved) and the enrollment is still reported done, instead of
    waiting for a silence timeout that blames the server."""
    from attrs import evolve

    core = make_core(1001)
    keystore = Keystore.create(tmp_path / "ks", "pass phrase", core.state())
    reactor = MemoryReactorClock()
    out: list[tuple[str, str]] = []
    app = ClientApp(
        reactor, keystore, evolve(core.state(), enrolled=False),
        "tcp:host=127.0.0.1:port=7500", lambda t, x: out.append((t, x)), core=core,
    )  # fmt: skip

    with saves_fail():
        app._handle(Directory((1001, 2002, 3003)), 0.0)
    assert app.enrolled.called
    assert ("error", "could not save the keystore: File too large") in out
    assert len(app._held) == 2 and app._queue == deque()  # two offers, none sent unsaved
    app.stop()
