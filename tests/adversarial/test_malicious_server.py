"""A malicious server: it holds every e2e blob and decides who gets what, when.

Driven at the level of the client's sans-IO core (:class:`ClientCore`), with
the server's relay replaced by the attacker's own routing.  What must hold:
the server never reads a message between users whose identity keys are
verified; a substitution of identity keys leaves the contacts ``unverified``
and is revealed the moment the two people compare safety numbers (or import
keys in person); reflected, duplicated, replayed and redirected blobs are
never shown; reordering within the 64-message window loses nothing.  What
it can do, and the user may not see, is in docs/security.rst: drop or hold
back messages, and lie about DELIVERED.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

import pytest

from enclaves.client.blob import MessageBlob, parse_blob
from enclaves.client.contacts import ContactError, Trust
from enclaves.client.core import (
    BlobDropped,
    ClientCore,
    Event,
    IdentityKeyChanged,
    KexCompleted,
    MessageReceived,
    Refused,
    SendBlob,
)
from enclaves.client.kex import KEX_TIMEOUT, MAX_EPOCH_JUMP
from enclaves.client.state import decode_state, encode_state
from tests.client.helpers import Relay, forged_offer, make_core

A, B, C = 100, 200, 300


class ManInTheMiddle:
    """The server runs its own KEX with each side: ``as_b`` talks to A as B, ``as_a`` to B as A."""

    def __init__(self, a: ClientCore, b: ClientCore) -> None:
        self.a, self.b = a, b
        self.as_b = make_core(B, seed=b"mallory")
        self.as_a = make_core(A, seed=b"mallory")
        self.route = {a: self.as_b, self.as_b: a, b: self.as_a, self.as_a: b}
        self.queue: deque[tuple[ClientCore, int, bytes, bytes]] = deque()
        self.events: dict[ClientCore, list[Event]] = {c: [] for c in self.route}

    def post(self, sender: ClientCore, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, SendBlob):
                sender.on_accepted(event.msg_id)
                target = self.route[sender]
                self.queue.append((target, sender.user_id, event.msg_id, event.blob))
            else:
                self.events[sender].append(event)

    def flush(self, now: float) -> None:
        for _ in range(100):
            if not self.queue:
                return
            target, sender, msg_id, blob = self.queue.popleft()
            self.post(target, target.handle_blob(sender, msg_id, blob, now))
        raise AssertionError("did not settle")

    def texts(self, core: ClientCore) -> list[str]:
        return [e.text for e in self.events[core] if isinstance(e, MessageReceived)]


def test_identity_key_substitution_leaves_unverified_and_safety_numbers_differ() -> None:
    """The server answers A's OFFER itself (as B) and offers to B itself (as A), so each
    side completes a KEX with the server.  Both must end ``unverified`` (the UI
    asks before the first message), the server can then read and relay, and the
    two people's safety numbers differ, so comparing them reveals it; an
    in-person import refuses the server's key."""
    a, b = make_core(A), make_core(B)
    mitm = ManInTheMiddle(a, b)
    mitm.post(a, a.on_directory([B], 0.0, start_kex=True))
    mitm.post(mitm.as_a, mitm.as_a.on_directory([B], 0.0, start_kex=True))
    mitm.flush(1.0)
    assert [type(e) for e in mitm.events[a]] == [KexCompleted]
    assert [type(e) for e in mitm.events[b]] == [KexCompleted]
    for me, other in ((a, B), (b, A)):
        assert me.contact(other).trust is Trust.UNVERIFIED
        refused = me.encrypt_message(other, "hello?", 2.0)
        assert isinstance(refused, Refused) and refused.reason == "confirm unverified"
    # Unverified means exactly this: the server reads and re-encrypts.
    mitm.post(a, [a.encrypt_message(B, "meet at noon", 2.0, confirmed=True)])
    mitm.flush(2.0)
    (stolen,) = mitm.texts(mitm.as_b)
    mitm.post(mitm.as_a, [mitm.as_a.encrypt_message(B, stolen, 2.5, confirmed=True)])
    mitm.flush(2.5)
    (shown,) = [e for e in mitm.events[b] if isinstance(e, MessageReceived)]
    assert (shown.text, shown.trust) == ("meet at noon", Trust.UNVERIFIED)
    # Comparing safety numbers reveals the substitution.
    assert a.safety_number(B) != b.safety_number(A)
    assert a.safety_number(B) == mitm.as_b.safety_number(A)
    assert b.safety_number(A) == mitm.as_a.safety_number(B)
    # Control: without the server in the middle the two numbers agree.
    honest_a, honest_b = make_core(A), make_core(B)
    relay = Relay(honest_a, honest_b)
    relay.post(A, honest_a.on_directory([B], 0.0, start_kex=True))
    relay.flush(1.0)
    assert honest_a.safety_number(B) == honest_b.safety_number(A)
    # Importing the real key in person refuses the server's.
    with pytest.raises(ContactError, match="NOT"):
        a.import_ik(B, b.own_ik_text(), 3.0)
    assert a.contact(B).trust is Trust.UNVERIFIED


def test_key_imported_in_person_defeats_substitution() -> None:
    """A imported B's key in person before any KEX.  The server's OFFER under its own
    key is held as an identity-key change: no pair keys with the server, and
    sending to B is refused, so nothing reaches the server readable."""
    a, b = make_core(A), make_core(B)
    a.add_contact(B)
    a.import_ik(B, b.own_ik_text(), 0.0)
    mitm = ManInTheMiddle(a, b)
    mitm.post(mitm.as_b, mitm.as_b.on_directory([A], 0.0, start_kex=True))
    mitm.flush(1.0)
    (alert,) = [e for e in mitm.events[a] if isinstance(e, IdentityKeyChanged)]
    assert alert.peer == B
    assert a.contact(B).current is None and a.contact(B).trust is Trust.IN_PERSON
    refused = a.encrypt_message(B, "secret", 2.0, confirmed=True)
    assert isinstance(refused, Refused) and refused.reason == "identity key changed"


def _pair() -> tuple[ClientCore, ClientCore, Relay]:
    a, b = make_core(A), make_core(B)
    relay = Relay(a, b)
    relay.post(A, a.on_directory([B], 0.0, start_kex=True))
    relay.flush(1.0)
    return a, b, relay


@pytest.mark.parametrize(("me", "peer"), [(A, B), (C, B)])
def test_reflected_key_exchange_is_dropped(me: int, peer: int) -> None:
    """The server sends a user's own OFFER back as the peer's, with a lower and with
    a higher peer id (crossing-offer rules differ).  Regression: the higher id
    used to answer its own OFFER, complete a "KEX" with itself and pin its own
    identity key on the contact.  Now it is dropped as reflected; a reflected
    ACCEPT does not end the user's outstanding exchange either, and the real
    exchange completes afterwards."""
    core, other = make_core(me), make_core(peer)
    (offer,) = core.start_kex(peer, 0.0)
    assert core.handle_blob(peer, b"r" * 16, offer.blob, 1.0) == [
        BlobDropped(peer, b"r" * 16, "reflected")
    ]
    contact = core.contact(peer)
    assert contact.ik is None and contact.current is None and contact.kex.pending is not None
    # The peer's real ACCEPT, and the same ACCEPT reflected back to the peer.
    events = other.handle_blob(me, offer.msg_id, offer.blob, 1.0)
    (accept,) = [e for e in events if isinstance(e, SendBlob)]
    assert other.handle_blob(me, b"s" * 16, accept.blob, 1.5) == [
        BlobDropped(me, b"s" * 16, "reflected")
    ]
    assert [type(e) for e in core.handle_blob(peer, accept.msg_id, accept.blob, 2.0)] == [
        KexCompleted,
        SendBlob,  # the KEY_CONFIRM
    ]
    assert core.contact(peer).ik == other.identity.public
    assert core.safety_number(peer) == other.safety_number(me)


def test_reflected_and_redirected_messages_are_never_shown() -> None:
    """The server sends A's message to B back to A (as B's, and as A's own), and to a
    third user C as A's.  None opens: the sender and recipient ids are bound
    into every message, and C's keys with A are other keys."""
    a, b, relay = _pair()
    c = make_core(C)
    relay.cores[C], relay.queues[C], relay.events[C] = c, deque(), []
    relay.post(C, c.on_directory([A], 2.0, start_kex=True))
    relay.flush(3.0)
    out = a.encrypt_message(B, "for B only", 4.0, confirmed=True)
    assert isinstance(out, SendBlob)
    assert a.handle_blob(B, b"1" * 16, out.blob, 5.0)[0].reason == "failed authentication"
    assert a.handle_blob(A, b"2" * 16, out.blob, 5.0)[0].reason == "bad sender"
    assert c.handle_blob(A, b"3" * 16, out.blob, 5.0)[0].reason == "failed authentication"
    assert [h.text for h in c.history(A)] == []
    assert b.handle_blob(A, out.msg_id, out.blob, 5.0)[0].text == "for B only"


def test_server_duplicates_reorders_holds_back_and_drops() -> None:
    """The server plays with A's 100 messages to B.  Duplicates (same or new msg_id)
    and replays are dropped; any order within the 64-message window shows
    every message once; a message held back by more than 64 is dropped as a
    replay, and a dropped one is simply missing: those two the user cannot
    tell from a message never sent (an accepted limit, docs/security.rst)."""
    a, b, _relay = _pair()
    outs = [a.encrypt_message(B, f"m{i}", 2.0, confirmed=True) for i in range(1, 101)]
    assert all(isinstance(o, SendBlob) for o in outs)
    m = {i: outs[i - 1] for i in range(1, 101)}
    shown: list[str] = []
    dropped: list[str] = []

    def deliver(i: int, msg_id: bytes | None = None) -> None:
        for event in b.handle_blob(A, msg_id or m[i].msg_id, m[i].blob, 3.0):
            if isinstance(event, MessageReceived):
                shown.append(event.text)
            elif isinstance(event, BlobDropped):
                dropped.append(event.reason)

    deliver(1)
    deliver(1)  # duplicate msg_id
    deliver(1, b"x" * 16)  # same blob, new msg_id: a replay
    for i in range(10, 1, -1):  # reordered within the window
        deliver(i)
    for i in range(12, 81):  # m11 held back...
        deliver(i)
    deliver(11)  # ...by more than 64: gone
    for i in range(83, 101):  # m81 and m82 dropped by the server
        deliver(i)
    expected = [1, *range(10, 1, -1), *range(12, 81), *range(83, 101)]
    assert shown == [f"m{i}" for i in expected]
    assert dropped == ["duplicate", "replay", "replay"]
    # The same blobs replayed after B restarts from its keystore: still dropped.
    restarted = ClientCore(decode_state(encode_state(b.state())))
    for i in (1, 50, 100):
        (event,) = restarted.handle_blob(A, m[i].msg_id, m[i].blob, 4.0)
        assert isinstance(event, BlobDropped)
        (event,) = restarted.handle_blob(A, bytes([i]) * 16, m[i].blob, 4.0)
        assert isinstance(event, BlobDropped) and event.reason == "replay"


def test_server_injecting_forged_offers_cannot_break_a_working_pair() -> None:
    """The server writes OFFERs of its own under each user's public identity key
    (its own EK and ML-KEM key, the next epochs), to both sides, every round,
    while the two chat and rekey twice for real.  Before the fix the answering
    side switched its sending keys to the forged exchange's, which nobody can
    compute: its messages were lost for good.  Now the forged keys stay
    tentative and are never confirmed; every message arrives, the real rekeys
    complete, and no forged exchange is ever reported as complete."""
    a, b, relay = _pair()
    cores = {A: a, B: b}
    sent: dict[int, list[str]] = {A: [], B: []}
    for rnd in range(6):
        now = 10.0 * (rnd + 1)
        for victim, impersonated in ((b, a), (a, b)):
            epoch = victim.contact(impersonated.user_id).epoch + 1 + rnd % 3
            msg_id = bytes([0xF0, rnd, victim.user_id % 256]) * 5 + b"\x00"
            blob = forged_offer(impersonated, epoch)
            relay.post(victim.user_id, victim.handle_blob(impersonated.user_id, msg_id, blob, now))
        if rnd == 2:
            relay.post(A, a.start_kex(B, now))
        if rnd == 4:
            relay.post(B, b.start_kex(A, now))
        for me, peer in ((a, B), (b, A)):
            text = f"{me.user_id} round {rnd}"
            out = me.encrypt_message(peer, text, now + 1.0, confirmed=True)
            assert isinstance(out, SendBlob)
            sent[me.user_id].append(text)
            relay.post(me.user_id, [out])
        relay.flush(now + 2.0)
    epochs = {me: [e.epoch for e in relay.of(me, KexCompleted)] for me in (A, B)}
    for me, peer in ((A, B), (B, A)):
        assert [e.text for e in relay.of(peer, MessageReceived)] == sent[me]
    # Only the first exchange and the two real rekeys (whose offers go above the
    # epochs answered tentatively, so they skip some numbers) ever completed.
    assert len(epochs[A]) == 3 and epochs[A] == epochs[B]
    last = epochs[A][-1]
    assert a.contact(B).epoch == b.contact(A).epoch == last
    assert a.contact(B).current.keys == b.contact(A).current.keys
    # The forged keys never became current; those at or below it are gone.
    for core, peer in ((a, B), (b, A)):
        assert all(t.epoch > last for t in cores[core.user_id].contact(peer).tentative)


# OFFER: kind 0, epoch 1-4, IK 5-36, EK 37-68, PQ 69-1252.
# ACCEPT: kind 0, epoch 1-4, IK 5-36, EK 37-68, ct 69-1156, confirm 1157-1172.
OFFER_FIELDS = {"kind": (0, 1), "epoch": (1, 5), "ik": (5, 37), "ek": (37, 69), "pq": (69, 1253)}
ACCEPT_FIELDS = {
    "kind": (0, 1),
    "epoch": (1, 5),
    "ik": (5, 37),
    "ek": (37, 69),
    "ct": (69, 1157),
    "confirm": (1157, 1173),
}


def _flips(fields: dict[str, tuple[int, int]]) -> list[tuple[str, int, int]]:
    """Every bit of kind and epoch; one bit of every byte of the keys and the tag; in
    PQ and ct the first, the last and every 29th byte (the bit moves along)."""
    out = []
    for name, (start, end) in fields.items():
        if end - start <= 4:
            out += [(name, i, bit) for i in range(start, end) for bit in range(8)]
        elif end - start <= 32:
            out += [(name, i, i % 8) for i in range(start, end)]
        else:
            out += [(name, i, i % 8) for i in [*range(start, end, 29), end - 1]]
    return out


def _flip(blob: bytes, index: int, bit: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 1 << bit
    return bytes(out)


def _recovers(a: ClientCore, b: ClientCore, now: float) -> None:
    """After the tampering A starts over through an honest relay: the pair ends with
    the same safety number on both sides, or B raises an identity key alarm (it
    pinned the key a tampered OFFER named) and sends nothing."""
    relay = Relay(a, b)
    # A new OFFER, or (while A's own is still outstanding) the same one again.
    restart = a.start_kex(B, now) or a.tick(now + KEX_TIMEOUT)
    assert len([e for e in restart if isinstance(e, SendBlob)]) == 1
    relay.post(A, restart)
    relay.flush(now + KEX_TIMEOUT + 1.0)
    if b.contact(A).pending_ik is not None:
        assert relay.of(B, IdentityKeyChanged)
        assert a.contact(B).current is None
        return
    assert a.contact(B).current is not None and b.contact(A).current is not None
    assert a.safety_number(B) == b.safety_number(A)
    relay.post(A, [a.encrypt_message(B, "after", now + KEX_TIMEOUT + 2.0, confirmed=True)])
    relay.flush(now + KEX_TIMEOUT + 2.0)
    assert [e.text for e in relay.of(B, MessageReceived)] == ["after"]


def test_bit_flips_in_offer_blobs() -> None:
    """The server flips one bit of A's OFFER to B, in every field.  B never raises;
    whatever B answers, A never completes that exchange (no pair keys, no identity
    key pinned for B, nothing sent to B), so nothing sealed under it is ever
    shown; and a fresh exchange afterwards either agrees (equal safety numbers)
    or makes B raise an identity key alarm."""
    fields_seen = set()
    for name, index, bit in _flips(OFFER_FIELDS):
        a, b = make_core(A), make_core(B)
        (offer,) = a.start_kex(B, 0.0)
        assert isinstance(offer, SendBlob)
        events = b.handle_blob(A, b"o" * 16, _flip(offer.blob, index, bit), 1.0)
        answers = [e for e in events if isinstance(e, SendBlob)]
        for answer in answers:
            got = a.handle_blob(B, answer.msg_id, answer.blob, 2.0)
            assert not [e for e in got if isinstance(e, KexCompleted | SendBlob)], (name, index)
        assert a.contact(B).current is None and a.contact(B).ik is None, (name, index)
        refused = a.encrypt_message(B, "secret", 3.0, confirmed=True)
        assert isinstance(refused, Refused), (name, index)
        if answers:
            fields_seen.add(name)
        _recovers(a, b, 10.0)
    # B could not tell a tampered public value from a real one: it answered those.
    assert {"ik", "ek", "pq"} <= fields_seen


WEDGE_EPOCH = 1 + MAX_EPOCH_JUMP  # epoch 1 with bit 2 of its third byte flipped


def test_an_offer_epoch_at_the_jump_limit_does_not_wedge_the_pair() -> None:
    """The server flips one bit of the epoch of A's first OFFER (1 becomes 1025, the
    most B accepts) or forges such an OFFER under A's public identity key.  B
    answers at 1025; A's confirmation fails.  Once the server relays honestly
    again, a fresh exchange must still agree: a denial of service by the server
    must end when the server stops."""
    a, b = make_core(A), make_core(B)
    (offer,) = a.start_kex(B, 0.0)
    assert isinstance(offer, SendBlob)
    flipped = _flip(offer.blob, 3, 2)
    assert int.from_bytes(flipped[1:5], "big") == WEDGE_EPOCH
    events = b.handle_blob(A, b"o" * 16, flipped, 1.0)
    (answer,) = [e for e in events if isinstance(e, SendBlob)]
    a.handle_blob(B, answer.msg_id, answer.blob, 2.0)
    assert b.contact(A).epoch == WEDGE_EPOCH and a.contact(B).current is None
    _recovers(a, b, 10.0)


def test_bit_flips_in_accept_blobs() -> None:
    """The server flips one bit of B's ACCEPT to A, in every field.  A never raises,
    never completes the exchange (no pair keys, no identity key pinned for B) and
    reports a failed exchange or drops the blob; a fresh exchange afterwards
    agrees (equal safety numbers) and carries a message."""
    outcomes = set()
    for name, index, bit in _flips(ACCEPT_FIELDS):
        a, b = make_core(A), make_core(B)
        (offer,) = a.start_kex(B, 0.0)
        assert isinstance(offer, SendBlob)
        (accept,) = [
            e for e in b.handle_blob(A, offer.msg_id, offer.blob, 1.0) if isinstance(e, SendBlob)
        ]
        got = a.handle_blob(B, accept.msg_id, _flip(accept.blob, index, bit), 2.0)
        assert not [e for e in got if isinstance(e, KexCompleted | SendBlob)], (name, index)
        assert a.contact(B).current is None and a.contact(B).ik is None, (name, index)
        outcomes |= {type(e).__name__ for e in got}
        _recovers(a, b, 10.0)
    assert {"KexFailed", "BlobDropped"} <= outcomes


def test_a_server_cannot_push_a_proven_pair_apart_for_good() -> None:
    """Found in review: the server pushes A's epoch far ahead of B's (a forged
    OFFER for A to answer at e + 512, a junk MESSAGE to make A offer above it,
    B's tentative keys for that exchange evicted by four forged OFFERs, A's
    KEY_CONFIRM held back, another forged OFFER lifting A's floor to the jump
    limit).  Every step is something a server can do.  Once it relays
    honestly again the pair must agree keys and carry messages both ways —
    B's own offers are stale for A and must be answered, not refused."""
    a, b = make_core(A), make_core(B)
    cores = {A: a, B: b}
    queue: deque[tuple[int, int, bytes, bytes]] = deque()

    def emit(src: int, events: list[Event]) -> None:
        queue.extend(
            (e.recipient, src, e.msg_id, e.blob) for e in events if isinstance(e, SendBlob)
        )

    def inject(to: int, blob: bytes, now: float) -> None:
        emit(to, cores[to].handle_blob(A + B - to, os.urandom(16), blob, now))

    def pump(
        now: float, hold: Callable[[tuple[int, int, bytes, bytes]], bool]
    ) -> list[tuple[int, int, bytes, bytes]]:
        held = []
        while queue:
            item = queue.popleft()
            if hold(item):
                held.append(item)
                continue
            to, src, msg_id, blob = item
            events = cores[to].handle_blob(src, msg_id, blob, now)
            got[to] += [e.text for e in events if isinstance(e, MessageReceived)]
            emit(to, events)
        return held

    got: dict[int, list[str]] = {A: [], B: []}
    t = 1000.0
    emit(A, a.on_directory([B], t, True))
    b.on_directory([A], t, False)
    pump(t, lambda item: False)
    e = a.contact(B).epoch
    inject(A, forged_offer(b, e + 512), t)
    queue.clear()  # A's ACCEPT dropped
    inject(A, MessageBlob(e + 600, os.urandom(48)).to_bytes(), t + 1)  # A heals above e+512
    held = pump(t + 1, lambda item: item[0] == B and isinstance(parse_blob(item[3]), MessageBlob))
    assert a.contact(B).epoch == e + 513 and held  # A's KEY_CONFIRM held back
    for _ in range(4):
        inject(B, forged_offer(a, e + 1), t + 1)
    queue.clear()
    assert all(k.epoch == e + 1 for k in b.contact(A).tentative)  # the real one evicted
    inject(A, forged_offer(b, a.contact(B).epoch + MAX_EPOCH_JUMP // 2), t + 1)
    queue.clear()
    queue.extend(held)
    # From here on the server is honest: three days of ticks and hourly messages.
    sent: dict[int, list[str]] = {A: [], B: []}
    for step in range(0, 3 * 86400, 300):
        now = t + 2 + step
        emit(A, a.tick(now))
        emit(B, b.tick(now))
        if step % 3600 == 0 and step >= 86400:
            for me, peer in ((a, B), (b, A)):
                text = f"{me.user_id} {step}"
                emit(me.user_id, [me.encrypt_message(peer, text, now, confirmed=True)])
                sent[me.user_id].append(text)
        pump(now, lambda item: False)
    assert a.contact(B).current.keys == b.contact(A).current.keys
    assert got[B][-len(sent[A]) :] == sent[A] and got[A][-len(sent[B]) :] == sent[B]
