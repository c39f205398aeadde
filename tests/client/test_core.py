"""ClientCore end to end through an in-memory relay: enrollment, chat, trust, rekey."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaves.client import kex
from enclaves.client.blob import Accept, parse_blob
from enclaves.client.contacts import MAX_TENTATIVE, ContactError, Trust, encode_ik
from enclaves.client.core import (
    HEAL_INTERVAL,
    BlobDropped,
    BlobFromRemoved,
    BlobHeld,
    ClientCore,
    IdentityKeyChanged,
    KexCompleted,
    KexFailed,
    KexRetried,
    KexStuck,
    MessageReceived,
    Refused,
    SendBlob,
)
from enclaves.client.kex import KEX_TIMEOUT, Entropy
from enclaves.client.state import decode_state, encode_state
from enclaves.crypto import x25519_public
from tests.client.helpers import Relay, forged_offer, make_core

A, B, C = 100, 200, 300


def pair(**options: float) -> tuple[ClientCore, ClientCore, Relay]:
    a, b = make_core(A, **options), make_core(B, **options)
    relay = Relay(a, b)
    relay.post(A, a.on_directory([B], now=0.0, start_kex=True))
    relay.flush(now=1.0)
    return a, b, relay


def send(core: ClientCore, relay: Relay, to: int, text: str, now: float) -> SendBlob:
    out = core.encrypt_message(to, text, now, confirmed=True)
    assert isinstance(out, SendBlob), out
    relay.post(core.user_id, [out])
    return out


def received(relay: Relay, user_id: int) -> list[str]:
    return [e.text for e in relay.of(user_id, MessageReceived)]


def test_three_users_enroll_and_everyone_has_keys() -> None:
    a, b, c = make_core(A), make_core(B), make_core(C)
    relay = Relay(a, b, c)
    relay.post(A, a.on_directory([], 0.0, start_kex=True))
    relay.post(B, b.on_directory([A], 0.0, start_kex=True))  # B joins: offers A
    relay.post(A, a.on_directory([B], 0.0, start_kex=False))  # JOINED: A only learns of B
    relay.flush(1.0)
    relay.post(C, c.on_directory([A, B], 2.0, start_kex=True))
    relay.flush(3.0)
    for x, y in ((a, b), (a, c), (b, c)):
        assert x.contact(y.user_id).current.keys == y.contact(x.user_id).current.keys
        assert x.contact(y.user_id).epoch == 1
        assert x.safety_number(y.user_id) == y.safety_number(x.user_id)
        assert x.contact(y.user_id).trust is Trust.UNVERIFIED
    send(a, relay, C, "hello C", 4.0)
    send(c, relay, B, "hello B", 4.0)
    relay.flush(5.0)
    assert received(relay, C) == ["hello C"] and received(relay, B) == ["hello B"]


def test_messages_both_ways_with_trust_and_history() -> None:
    a, b, relay = pair()
    first = a.encrypt_message(B, "hi", 2.0)
    assert isinstance(first, Refused) and first.reason == "confirm unverified"
    send(a, relay, B, "hi", 2.0)
    send(b, relay, A, "hello back", 2.5)
    relay.flush(3.0)
    (msg,) = relay.of(B, MessageReceived)
    assert (msg.sender, msg.text, msg.trust, msg.unix_ms, msg.epoch) == (
        A, "hi", Trust.UNVERIFIED, 2000, 1
    )  # fmt: skip
    assert received(relay, A) == ["hello back"]
    # Confirmation is asked only once per contact.
    assert isinstance(a.encrypt_message(B, "again", 4.0), SendBlob)
    assert [(h.direction, h.text) for h in b.history(A)] == [("out", "hello back"), ("in", "hi")]


def test_no_keys_yet_is_refused() -> None:
    a = make_core(A)
    a.on_directory([B], 0.0, start_kex=True)
    out = a.encrypt_message(B, "x", 1.0, confirmed=True)
    assert isinstance(out, Refused) and out.reason == "no keys"
    assert isinstance(a.encrypt_message(999, "x", 1.0), Refused)


def test_reflection_and_duplicates_are_dropped() -> None:
    a, b, relay = pair()
    out = send(a, relay, B, "once", 2.0)
    relay.flush(3.0)
    relay.queues[A].clear()
    # The server reflects A's own message back to A as if B sent it.
    assert a.handle_blob(B, b"r" * 16, out.blob, 4.0) == [
        BlobDropped(B, b"r" * 16, "failed authentication")
    ]
    # Same msg_id again: dropped by the de-dup set; new msg_id: by the counter window.
    assert b.handle_blob(A, out.msg_id, out.blob, 4.0)[0].reason == "duplicate"
    assert b.handle_blob(A, b"n" * 16, out.blob, 4.0)[0].reason == "replay"
    assert received(relay, B) == ["once"]


def test_out_of_order_within_window_is_accepted() -> None:
    a, b, _relay = pair()
    outs = [a.encrypt_message(B, f"m{i}", 2.0, confirmed=True) for i in range(5)]
    for out in reversed(outs):
        b.handle_blob(A, out.msg_id, out.blob, 3.0)
    assert [h.text for h in b.history(A)] == ["m4", "m3", "m2", "m1", "m0"]


def test_crossing_offers_converge_in_the_core() -> None:
    a, b = make_core(A), make_core(B)
    relay = Relay(a, b)
    relay.post(A, a.start_kex(B, 0.0))
    relay.post(B, b.start_kex(A, 0.0))
    relay.flush(1.0)
    assert a.contact(B).current.keys == b.contact(A).current.keys
    assert a.contact(B).epoch == b.contact(A).epoch == 1
    assert a.contact(B).kex.pending is None and b.contact(A).kex.pending is None
    send(b, relay, A, "converged", 2.0)
    relay.flush(2.0)
    assert received(relay, A) == ["converged"]


def test_rekey_and_grace_period() -> None:
    a, b, relay = pair(grace=100.0)
    old_keys = a.contact(B).current.keys
    relay.post(A, a.start_kex(B, 10.0))  # OFFER epoch 2 queued for B
    # A message sealed under epoch 1 after the offer reaches B after B rekeyed.
    late = send(a, relay, B, "sealed at epoch 1", 10.5)
    relay.flush(11.0)
    assert a.contact(B).epoch == b.contact(A).epoch == 2
    assert a.contact(B).current.keys != old_keys
    assert received(relay, B) == ["sealed at epoch 1"]
    # Within the grace period a delayed epoch-1 message still opens...
    stale = a.encrypt_message(B, "x", 11.0)
    assert isinstance(stale, SendBlob) and stale.blob[1:5] == (2).to_bytes(4, "big")
    # ...and after it the old keys are deleted.
    relay.post(B, b.tick(200.0))
    assert b.contact(A).previous is None
    dropped, heal = b.handle_blob(A, b"y" * 16, late.blob, 200.0)
    assert dropped == BlobDropped(A, b"y" * 16, "epoch keys deleted")
    # A message under deleted keys means the pair may be out of step: B offers a
    # fresh exchange (rate limited, see test_undecryptable_epoch_heals_rate_limited).
    assert isinstance(heal, SendBlob) and heal.kind == "kex" and heal.blob[0] == 0x02


def test_identity_key_change_blocks_sending_until_accepted() -> None:
    a, _b, relay = pair()
    before = a.safety_number(B)
    # B reinstalls: same id, new identity key, starts over.
    b2 = make_core(B, seed=b"reinstalled")
    relay.cores[B] = b2
    relay.post(B, b2.on_directory([A], 5.0, start_kex=True))
    relay.flush(6.0)
    (alert,) = relay.of(A, IdentityKeyChanged)
    assert alert.peer == B and alert.safety_number != before
    out = a.encrypt_message(B, "blocked?", 7.0, confirmed=True)
    assert isinstance(out, Refused) and out.reason == "identity key changed"
    assert a.pending_safety_number(B) == alert.safety_number
    with pytest.raises(ContactError):
        a.verify(B)
    relay.post(A, a.accept_new_ik(B, 8.0))
    relay.flush(9.0)
    assert a.contact(B).trust is Trust.UNVERIFIED and a.contact(B).pending_ik is None
    assert a.contact(B).current.keys == b2.contact(A).current.keys
    assert a.safety_number(B) == b2.safety_number(A) == alert.safety_number
    send(a, relay, B, "after accept", 10.0)
    relay.flush(10.0)
    assert received(relay, B) == ["after accept"]


def test_import_in_person_and_verify() -> None:
    a, b, relay = pair()
    a.verify(B)
    assert a.contact(B).trust is Trust.VERIFIED
    relay.events[A].clear()
    assert a.import_ik(B, b.own_ik_text(), 2.0) == []
    assert a.contact(B).trust is Trust.IN_PERSON
    with pytest.raises(ContactError, match="NOT"):
        b.import_ik(A, encode_ik(bytes(range(32))), 2.0)
    assert b.contact(A).trust is Trust.UNVERIFIED
    send(a, relay, B, "x", 3.0)
    send(b, relay, A, "y", 3.0)
    relay.flush(3.0)
    assert relay.of(A, MessageReceived)[0].trust is Trust.IN_PERSON


def test_tampered_accept_is_reported_and_dropped() -> None:
    a, b = make_core(A), make_core(B)
    (offer,) = a.start_kex(B, 0.0)
    (accept,) = [
        e for e in b.handle_blob(A, offer.msg_id, offer.blob, 1.0) if isinstance(e, SendBlob)
    ]
    bad = bytearray(accept.blob)
    bad[200] ^= 1
    events = a.handle_blob(B, b"t" * 16, bytes(bad), 2.0)
    assert [type(e) for e in events] == [KexFailed]
    assert a.contact(B).current is None and a.contact(B).ik is None
    # Only that ACCEPT is dropped: the genuine one still completes the exchange.
    assert a.contact(B).kex.pending is not None
    events = a.handle_blob(B, accept.msg_id, accept.blob, 3.0)
    assert [type(e) for e in events] == [KexCompleted, SendBlob]
    assert a.contact(B).current.keys == b.contact(A).current.keys


def test_unanswered_offer_is_retried_then_reported() -> None:
    a = make_core(A, kex_timeout=60.0, kex_max_offers=2)
    (offer,) = a.start_kex(B, 0.0)
    assert a.tick(30.0) == []
    retry = a.tick(60.0)
    assert [type(e) for e in retry] == [SendBlob, KexRetried]
    assert retry[0].blob == offer.blob and retry[0].msg_id != offer.msg_id
    assert [type(e) for e in a.tick(120.0)] == [KexStuck]
    assert a.tick(500.0) == []


def test_messages_before_keys_are_held_then_opened() -> None:
    a, b = make_core(A), make_core(B)
    (offer,) = a.start_kex(B, 0.0)
    events = b.handle_blob(A, offer.msg_id, offer.blob, 1.0)
    accept = next(e for e in events if isinstance(e, SendBlob))
    msg = b.encrypt_message(A, "early", 1.5, confirmed=True)
    # The message overtakes the ACCEPT (e.g. resent from the outbox first).
    assert [type(e) for e in a.handle_blob(B, msg.msg_id, msg.blob, 2.0)] == [BlobHeld]
    events = a.handle_blob(B, accept.msg_id, accept.blob, 2.0)
    assert [type(e) for e in events] == [KexCompleted, SendBlob, MessageReceived]
    assert events[1].kind == "kex"  # A's KEY_CONFIRM
    assert events[2].text == "early"


def test_an_accepted_message_deleted_unread_becomes_failed_once() -> None:
    a, b = make_core(A), make_core(B)
    relay = Relay(a, b)
    relay.post(A, a.start_kex(B, 0.0))
    relay.flush(1.0)
    lost = a.encrypt_message(B, "lost", 2.0, confirmed=True)
    read = a.encrypt_message(B, "read", 2.0, confirmed=True)
    assert a.on_lost(lost.msg_id) is None  # not accepted yet: an ordinary refusal's job
    for out in (lost, read):
        a.on_accepted(out.msg_id)
    a.on_delivered(read.msg_id)
    assert a.on_lost(lost.msg_id) == B
    assert [line.status for line in a.history(B)[-2:]] == ["failed", "delivered"]
    assert a.on_lost(lost.msg_id) is None  # a repeated notice
    assert a.on_lost(read.msg_id) is None  # delivered stays delivered
    assert a.history(B)[-1].status == "delivered"


def test_outbox_receipts_and_failures() -> None:
    a, b = make_core(A), make_core(B)
    relay = Relay(a, b)
    relay.post(A, a.start_kex(B, 0.0))
    relay.flush(1.0)
    out = a.encrypt_message(B, "hello", 2.0, confirmed=True)
    assert [e.msg_id for e in a.pending_sends()] == [out.msg_id]
    a.on_refused(out.msg_id, "quota exceeded")
    assert a.pending_sends() == []
    (entry,) = a.outbox()
    assert (entry.status, entry.reason) == ("failed", "quota exceeded")
    assert a.history(B)[-1].status == "failed"
    again = a.retry(out.msg_id)
    assert again.blob == out.blob and a.history(B)[-1].status == "sending"
    a.on_accepted(out.msg_id)
    assert a.outbox() == [] and a.history(B)[-1].status == "accepted"
    assert a.on_delivered(out.msg_id) == B and a.history(B)[-1].status == "delivered"
    # A repeated DELIVERED (a notice, or the server resending after a restart)
    # changes nothing and is not reported again.
    assert a.on_delivered(out.msg_id) is None and a.history(B)[-1].status == "delivered"


def test_state_survives_a_restart_mid_exchange() -> None:
    a, b = make_core(A), make_core(B)
    (offer,) = a.start_kex(B, 0.0)
    # A restarts with an OFFER outstanding: its ephemeral secrets are in the keystore.
    a2 = ClientCore(decode_state(encode_state(a.state())))
    events = b.handle_blob(A, offer.msg_id, offer.blob, 1.0)
    accept = next(e for e in events if isinstance(e, SendBlob))
    assert isinstance(a2.handle_blob(B, accept.msg_id, accept.blob, 2.0)[0], KexCompleted)
    out = b.encrypt_message(A, "persisted", 3.0, confirmed=True)
    a3 = ClientCore(decode_state(encode_state(a2.state())))
    assert a3.handle_blob(B, out.msg_id, out.blob, 4.0)[0].text == "persisted"
    # The de-dup set and the replay window were saved too.
    a4 = ClientCore(decode_state(encode_state(a3.state())))
    assert a4.handle_blob(B, out.msg_id, out.blob, 5.0)[0].reason == "duplicate"
    assert a4.handle_blob(B, b"q" * 16, out.blob, 5.0)[0].reason == "replay"


def test_petnames_and_find() -> None:
    a, _b, _relay = pair()
    a.set_petname(B, "bob")
    assert a.find("bob").user_id == B and a.find(str(B)).user_id == B
    with pytest.raises(ContactError):
        a.set_petname(B, "123")
    with pytest.raises(ContactError):
        a.find("carol")
    assert "bob" not in repr(a.state())


def test_garbage_blobs_never_raise() -> None:
    a, _b, _relay = pair()
    for i, junk in enumerate(
        [b"", b"\x01", b"\x02" + bytes(10), b"\x09" * 80, b"\x01" + bytes(52)]
    ):
        events = a.handle_blob(B, bytes([i]) * 16, junk, 1.0)
        assert len(events) == 1 and isinstance(events[0], BlobDropped)
    assert a.handle_blob(A, b"s" * 16, b"\x01", 1.0)[0].reason == "bad sender"


def test_restored_backup_resynchronises_with_rekey() -> None:
    """A restored an old backup (epoch 1) while B is at 3: B answers A's stale
    OFFER for epoch 2 tentatively, A completes it, and its KEY_CONFIRM makes B
    take epoch 2 although it is below B's own."""
    a, b, relay = pair()
    backup = encode_state(a.state())  # A's keystore copy at epoch 1
    for now in (2.0, 3.0):
        relay.post(B, b.start_kex(A, now))
        relay.flush(now)
    assert b.contact(A).epoch == 3
    restored = ClientCore(decode_state(backup))
    relay.cores[A] = restored
    relay.post(A, restored.start_kex(B, 4.0))  # offers epoch 2: stale for B
    relay.flush(5.0)
    assert restored.contact(B).epoch == b.contact(A).epoch == 2
    assert restored.contact(B).current.keys == b.contact(A).current.keys
    send(restored, relay, B, "back", 6.0)
    send(b, relay, A, "welcome back", 6.0)
    relay.flush(6.0)
    assert received(relay, B) == ["back"] and received(relay, A) == ["welcome back"]


def test_first_ik_is_learned_only_from_a_completed_exchange() -> None:
    a, b = make_core(A), make_core(B)
    (offer,) = a.start_kex(B, 0.0)
    accept = next(
        e for e in b.handle_blob(A, offer.msg_id, offer.blob, 1.0) if isinstance(e, SendBlob)
    )
    forged = bytearray(accept.blob)
    forged[5:37] = make_core(B, seed=b"mallory").identity.public  # substituted IK_B
    assert [type(e) for e in a.handle_blob(B, b"f" * 16, bytes(forged), 2.0)] == [KexFailed]
    assert a.contact(B).ik is None  # the forged key was not pinned
    assert b.contact(A).ik == a.identity.public


def test_unusable_offers_are_reported_not_raised() -> None:
    a, b = make_core(A), make_core(B)
    (offer,) = a.start_kex(B, 0.0)
    zero_ek = offer.blob[:37] + bytes(32) + offer.blob[69:]
    far = offer.blob[:1] + (5000).to_bytes(4, "big") + offer.blob[5:]
    # The first makes B offer an exchange of its own (the peer may be unable
    # to take ours); the second finds that offer pending and sends nothing.
    kinds = [[type(e) for e in b.handle_blob(A, bytes([i]) * 16, blob, 1.0)]
             for i, blob in enumerate((zero_ek, far))]  # fmt: skip
    assert kinds == [[KexFailed, SendBlob], [KexFailed]]
    assert b.contact(A).current is None and b.contact(A).ik is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([1, 2, 3]),
    epoch=st.sampled_from([0, 1, 2, 3, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    body=st.binary(max_size=64),
    fill=st.integers(0, 255),
)
def test_handle_blob_never_raises(kind: int, epoch: int, body: bytes, fill: int) -> None:
    """Right-sized OFFER/ACCEPT/MESSAGE blobs with arbitrary contents: events, never a crash."""
    size = {1: 5 + 48 + 16 * (len(body) % 4), 2: 1253, 3: 1173}[kind]
    payload = (
        (body * (size // max(len(body), 1) + 1))[: size - 5] if body else bytes([fill]) * (size - 5)
    )
    blob = bytes([kind]) + epoch.to_bytes(4, "big") + payload
    core = _ESTABLISHED
    events = core.handle_blob(B, core._entropy.random_bytes(16), blob, 5.0)
    assert events and all(not isinstance(e, MessageReceived) for e in events)


_ESTABLISHED = pair()[0]


def test_removed_contact_is_a_tombstone_and_its_id_never_rekeys() -> None:
    """REMOVED then a KEX "from" the same id under another key: refused, key kept."""
    a, b, _relay = pair()
    a.import_ik(B, encode_ik(b.identity.public), 2.0)
    pending = a.encrypt_message(B, "unsent", 2.5)
    assert isinstance(pending, SendBlob)
    a.remove_contact(B)
    tomb = a.contact(B)
    assert tomb.removed and tomb.ik == b.identity.public and tomb.trust is Trust.IN_PERSON
    assert tomb.current is None and tomb.previous is None
    assert [e.status for e in a.outbox()] == ["failed"]
    assert B not in [c.user_id for c in a.contacts()]
    assert B in [c.user_id for c in a.contacts(include_removed=True)]
    impostor = make_core(B, seed=b"impostor")
    offer = impostor.start_kex(A, 3.0)[0]
    assert isinstance(offer, SendBlob)
    events = a.handle_blob(B, b"\x03" * 16, offer.blob, 4.0)
    assert events == [BlobFromRemoved(B, b"\x03" * 16)]
    assert a.contact(B).ik == b.identity.public and a.contact(B).trust is Trust.IN_PERSON
    refused = a.encrypt_message(B, "hi", 5.0, confirmed=True)
    assert isinstance(refused, Refused) and refused.reason == "removed"
    assert a.start_kex(B, 5.0) == [] and a.on_directory([B], 5.0, start_kex=True) == []
    # The tombstone survives the keystore.
    again = ClientCore(decode_state(encode_state(a.state())))
    assert again.contact(B).removed and again.contact(B).ik == b.identity.public


# -- forged and replayed OFFERs: the responder's keys stay tentative ----------------


def test_forged_offer_leaves_the_working_pair_alone() -> None:
    """The server forges an OFFER as A (A's IK, its own EK/PQ, next epoch).  B answers
    but keeps sending under the epoch A holds, so A still reads B; the forged
    tentative keys are dropped when a real rekey completes."""
    a, b, relay = pair()
    events = b.handle_blob(A, b"f" * 16, forged_offer(a, 2), 2.0)
    (accept,) = [e for e in events if isinstance(e, SendBlob)]
    assert not [e for e in events if isinstance(e, KexCompleted)]
    contact = b.contact(A)
    assert contact.epoch == 1 and [t.epoch for t in contact.tentative] == [2]
    # The forged exchange's ACCEPT reaches A: A has no offer out, so it is ignored.
    relay.post(B, [accept])
    relay.flush(2.5)
    out = send(b, relay, A, "still readable", 3.0)
    assert out.blob[1:5] == (1).to_bytes(4, "big")
    send(a, relay, B, "and back", 3.0)
    relay.flush(3.5)
    assert received(relay, A) == ["still readable"] and received(relay, B) == ["and back"]
    # A real rekey then completes; both promote and the forged keys are gone.
    relay.post(A, a.start_kex(B, 4.0))
    relay.flush(4.5)
    assert a.contact(B).epoch == b.contact(A).epoch == 2
    assert a.contact(B).current.keys == b.contact(A).current.keys
    assert b.contact(A).tentative == () and b.contact(A).kex.pending is None
    send(b, relay, A, "epoch 2", 5.0)
    send(a, relay, B, "epoch 2 back", 5.0)
    relay.flush(5.5)
    assert received(relay, A)[-1] == "epoch 2" and received(relay, B)[-1] == "epoch 2 back"


def test_replayed_old_offer_leaves_the_working_pair_alone() -> None:
    """A's first OFFER replayed as is (answer resent, nothing changes), and with its
    epoch rewritten upwards (A deleted its ephemeral keys long ago): B keeps
    sending under the working keys."""
    a, b, relay = pair()
    (old_offer,) = [e.blob for sender, e in relay.log if sender == A and e.kind == "kex"][:1]
    again = b.handle_blob(A, b"r" * 16, old_offer, 2.0)
    assert [type(e) for e in again] == [SendBlob] and b.contact(A).tentative == ()
    for i, epoch in enumerate((2, 3, 900)):
        bumped = old_offer[:1] + epoch.to_bytes(4, "big") + old_offer[5:]
        relay.post(B, b.handle_blob(A, bytes([i]) * 16, bumped, 2.0))
    relay.flush(2.5)
    assert b.contact(A).epoch == a.contact(B).epoch == 1
    assert [t.epoch for t in b.contact(A).tentative] == [2, 3, 900]
    send(b, relay, A, "unharmed", 3.0)
    send(a, relay, B, "unharmed too", 3.0)
    relay.flush(3.5)
    assert received(relay, A) == ["unharmed"] and received(relay, B) == ["unharmed too"]
    # B's own rekey goes above the epochs it answered, except one so far ahead
    # that A would refuse it; it completes and drops the tentative keys below.
    (offer,) = b.start_kex(A, 4.0)
    assert offer.blob[1:5] == (4).to_bytes(4, "big")
    relay.post(B, [offer])
    relay.flush(4.5)
    assert a.contact(B).epoch == b.contact(A).epoch == 4
    assert [t.epoch for t in b.contact(A).tentative] == [900]


def test_key_confirm_promotes_the_tentative_keys() -> None:
    """A real rekey by A: B's new keys are receive-only until A's KEY_CONFIRM
    (sealed under the new epoch, never shown) authenticates."""
    a, b, _relay = pair()
    (offer,) = a.start_kex(B, 2.0)
    (accept,) = [
        e for e in b.handle_blob(A, offer.msg_id, offer.blob, 2.0) if isinstance(e, SendBlob)
    ]
    assert b.contact(A).epoch == 1 and [t.epoch for t in b.contact(A).tentative] == [2]
    meanwhile = b.encrypt_message(A, "before the confirm", 2.1, confirmed=True)
    assert isinstance(meanwhile, SendBlob) and meanwhile.blob[1:5] == (1).to_bytes(4, "big")
    completed, confirm = a.handle_blob(B, accept.msg_id, accept.blob, 2.2)
    assert completed == KexCompleted(B, 2, False)
    assert isinstance(confirm, SendBlob) and confirm.kind == "kex" and confirm.blob[0] == 0x01
    assert confirm.blob[1:5] == (2).to_bytes(4, "big")
    # B's message sealed before the promotion still opens at A (grace period).
    assert a.handle_blob(B, meanwhile.msg_id, meanwhile.blob, 2.3)[0].text == "before the confirm"
    assert b.handle_blob(A, confirm.msg_id, confirm.blob, 2.4) == [KexCompleted(A, 2, False)]
    assert b.contact(A).epoch == 2 and b.contact(A).tentative == ()
    assert b.contact(A).current.keys == a.contact(B).current.keys
    assert b.history(A)[-1].text == "before the confirm"  # the confirm is not history
    after = b.encrypt_message(A, "now under 2", 2.5)
    assert isinstance(after, SendBlob) and after.blob[1:5] == (2).to_bytes(4, "big")
    assert a.handle_blob(B, after.msg_id, after.blob, 2.6)[0].text == "now under 2"
    # A replayed KEY_CONFIRM is dropped like any replayed message.
    assert b.handle_blob(A, b"k" * 16, confirm.blob, 2.7)[0].reason == "replay"


def test_any_message_under_the_new_epoch_promotes() -> None:
    """The server drops A's KEY_CONFIRM: A's next message under the new epoch
    promotes B's keys just the same, and is shown."""
    a, b, _relay = pair()
    (offer,) = a.start_kex(B, 2.0)
    (accept,) = [
        e for e in b.handle_blob(A, offer.msg_id, offer.blob, 2.0) if isinstance(e, SendBlob)
    ]
    a.handle_blob(B, accept.msg_id, accept.blob, 2.2)  # its KEY_CONFIRM is lost
    out = a.encrypt_message(B, "new epoch", 3.0, confirmed=True)
    events = b.handle_blob(A, out.msg_id, out.blob, 3.0)
    assert [type(e) for e in events] == [KexCompleted, MessageReceived]
    assert b.contact(A).epoch == 2 and events[1].text == "new epoch"


def test_tentative_keys_are_kept_while_the_peer_stays_on_the_old_epoch() -> None:
    """B answered an OFFER that was never confirmed: for days A goes on under the
    old epoch and nothing breaks (no grace period runs on unconfirmed keys)."""
    a, b, relay = pair(grace=100.0)
    relay.post(B, b.handle_blob(A, b"f" * 16, forged_offer(a, 2), 2.0))
    relay.flush(2.0)
    for day in range(1, 4):
        now = day * 86400.0
        relay.post(A, a.tick(now))
        relay.post(B, b.tick(now))
        send(a, relay, B, f"day {day}", now)
        send(b, relay, A, f"day {day} back", now)
        relay.flush(now)
    assert received(relay, B) == ["day 1", "day 2", "day 3"]
    assert received(relay, A) == ["day 1 back", "day 2 back", "day 3 back"]
    assert b.contact(A).epoch == 1


def test_crossing_rekeys_still_resolve() -> None:
    """Both sides rekey at once (same epoch): the lower id's offer wins, the loser's
    tentative keys are promoted by the winner's KEY_CONFIRM and its own offer
    is dropped then."""
    a, b, relay = pair()
    relay.post(A, a.start_kex(B, 2.0))
    relay.post(B, b.start_kex(A, 2.0))
    relay.flush(3.0)
    for me, other in ((a, B), (b, A)):
        contact = me.contact(other)
        assert contact.epoch == 2 and contact.tentative == () and contact.kex.pending is None
    assert a.contact(B).current.keys == b.contact(A).current.keys
    send(a, relay, B, "x", 4.0)
    send(b, relay, A, "y", 4.0)
    relay.flush(4.0)
    assert received(relay, B) == ["x"] and received(relay, A) == ["y"]


def test_forged_offer_does_not_cancel_our_own_rekey() -> None:
    """B is rekeying; the server forges a higher (or same-epoch, lower-id) OFFER as A.
    B answers it but keeps its own offer, and A's real ACCEPT completes it."""
    for forged_epoch in (2, 3):
        a, b, relay = pair()
        (offer,) = b.start_kex(A, 2.0)
        b.handle_blob(A, b"f" * 16, forged_offer(a, forged_epoch), 2.1)
        assert b.contact(A).kex.pending is not None
        relay.post(B, [offer])
        relay.flush(3.0)
        assert a.contact(B).epoch == b.contact(A).epoch == 2
        assert a.contact(B).current.keys == b.contact(A).current.keys
        send(a, relay, B, "x", 4.0)
        send(b, relay, A, "y", 4.0)
        relay.flush(4.0)
        assert received(relay, B) == ["x"] and received(relay, A) == ["y"]


def test_forged_first_offer_heals() -> None:
    """No keys yet: a forged first OFFER as A is adopted at once by B (there is no
    working pair to protect; a substituted identity key is the trust levels'
    job).  B's message under it is undecryptable for A, which offers a fresh
    exchange; the pair ends in step and later messages flow both ways."""
    a, b = make_core(A), make_core(B)
    relay = Relay(a, b)
    a.add_contact(B)
    relay.post(B, b.handle_blob(A, b"f" * 16, forged_offer(a, 1), 1.0))
    assert b.contact(A).epoch == 1
    lost = send(b, relay, A, "lost", 1.5)
    relay.flush(2.0)
    assert received(relay, A) == [] and lost.msg_id in {e.msg_id for e in relay.of(A, BlobHeld)}
    assert a.contact(B).current.keys == b.contact(A).current.keys
    send(b, relay, A, "healed", 3.0)
    send(a, relay, B, "healed back", 3.0)
    relay.flush(3.5)
    assert received(relay, A) == ["healed"] and received(relay, B) == ["healed back"]


def test_forged_first_offer_crossing_our_offer_heals() -> None:
    """B offers first; the server forges A's answer-winning same-epoch OFFER.  B adopts
    the forged keys at once but keeps its own offer, so A's real ACCEPT
    replaces them."""
    a, b = make_core(A), make_core(B)
    relay = Relay(a, b)
    (offer,) = b.start_kex(A, 0.0)
    b.handle_blob(A, b"f" * 16, forged_offer(a, 1), 0.5)
    relay.post(B, [offer])
    relay.flush(1.0)
    assert a.contact(B).current.keys == b.contact(A).current.keys
    assert b.contact(A).kex.pending is None
    send(a, relay, B, "x", 2.0)
    send(b, relay, A, "y", 2.0)
    relay.flush(2.0)
    assert received(relay, B) == ["x"] and received(relay, A) == ["y"]


def test_undecryptable_epoch_heals_rate_limited() -> None:
    """A MESSAGE under an epoch we hold no keys for starts a fresh exchange, at most
    once per HEAL_INTERVAL (the server can inject such blobs at will)."""
    a, b, relay = pair()
    bogus = b"\x01" + (7).to_bytes(4, "big") + bytes(64)
    held, heal = a.handle_blob(B, b"1" * 16, bogus, 2.0)
    assert isinstance(held, BlobHeld) and isinstance(heal, SendBlob) and heal.kind == "kex"
    relay.post(A, [heal])
    relay.flush(2.5)
    assert a.contact(B).epoch == b.contact(A).epoch == 2
    assert [type(e) for e in a.handle_blob(B, b"2" * 16, bogus, 3.0)] == [BlobHeld]
    later = a.handle_blob(B, b"3" * 16, bogus, 2.0 + HEAL_INTERVAL)
    assert [type(e) for e in later] == [BlobHeld, SendBlob]


def _forged_accept(peer: ClientCore, epoch: int) -> bytes:
    """An ACCEPT with ``peer``'s identity key and random everything else."""
    rnd = Entropy().random_bytes
    return Accept(epoch, peer.identity.public, rnd(32), rnd(1088), rnd(16)).to_bytes()


_ATTACK = st.lists(
    st.one_of(
        st.tuples(st.just("forge"), st.sampled_from([A, B]), st.integers(0, 3)),
        st.tuples(st.just("replay"), st.sampled_from([A, B]), st.integers(0, 3)),
        st.tuples(st.just("accept"), st.sampled_from([A, B]), st.integers(0, 2)),
        st.tuples(st.just("send"), st.sampled_from([A, B]), st.just(0)),
        st.tuples(st.just("rekey"), st.sampled_from([A, B]), st.just(0)),
        st.tuples(st.just("deliver"), st.sampled_from([A, B]), st.integers(1, 3)),
        st.tuples(st.just("wait"), st.just(0), st.sampled_from([1, 700])),
    ),
    max_size=25,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ATTACK)
def test_forged_and_replayed_offers_never_break_the_pair(ops: list[tuple[str, int, int]]) -> None:
    """Any sequence of forged OFFERs (a user's public IK, the server's EK/PQ, any
    epoch from current to current+3), replayed OFFERs (as sent, and with the
    epoch rewritten), forged ACCEPTs, interleaved with real messages and
    rekeys delivered in order.  Nothing is shown twice or out of order; with
    only a few forged OFFERs above the current epoch (fewer than the
    tentative slots) every message is shown; and whatever the attack, the
    pair is back in step and talking both ways after at most a few
    self-healing rounds."""
    a, b, relay = pair()
    cores = {A: a, B: b}
    other = {A: B, B: A}
    sent: dict[int, list[str]] = {A: [], B: []}
    now = 2.0
    for i, (op, who, arg) in enumerate(ops):
        now += 1.0
        msg_id = b"\xee" + i.to_bytes(15, "big")
        if op == "wait":
            now += arg
            for uid in (A, B):
                relay.post(uid, cores[uid].tick(now))
            continue
        me, peer = cores[who], cores[other[who]]
        if op == "forge":
            blob = forged_offer(peer, me.contact(peer.user_id).epoch + arg)
            relay.post(who, me.handle_blob(peer.user_id, msg_id, blob, now))
        elif op == "replay":
            offers = [e.blob for s, e in relay.log if s == peer.user_id and e.blob[0] == 0x02]
            if offers:
                old = offers[arg % len(offers)]
                epoch = (me.contact(peer.user_id).epoch + arg).to_bytes(4, "big")
                for blob in (old, old[:1] + epoch + old[5:]):
                    relay.post(who, me.handle_blob(peer.user_id, msg_id, blob, now))
                    msg_id = msg_id[:-1] + b"\xff"
        elif op == "accept":
            blob = _forged_accept(peer, me.contact(peer.user_id).epoch + arg)
            relay.post(who, me.handle_blob(peer.user_id, msg_id, blob, now))
        elif op == "send":
            text = f"{who}-{i}"
            sent[who].append(text)
            send(me, relay, peer.user_id, text, now)
        elif op == "rekey":
            relay.post(who, me.start_kex(peer.user_id, now))
        else:
            relay.deliver(who, now, limit=arg)
    relay.flush(now + 1.0)
    for uid in (A, B):
        shown = received(relay, other[uid])
        assert shown == [t for t in sent[uid] if t in shown]  # a subsequence: once, in order
    injected = {uid: 0 for uid in (A, B)}
    for op, who, arg in ops:
        if op in ("forge", "replay"):
            injected[who] += 99 if op == "replay" or arg == 0 else 1
    if max(injected.values()) < MAX_TENTATIVE:
        # Forged OFFERs alone (no replays or stale offers forcing rekeys): no loss.
        assert received(relay, B) == sent[A] and received(relay, A) == sent[B]
    for attempt in range(4):
        now += HEAL_INTERVAL
        for uid in (A, B):
            relay.post(uid, cores[uid].tick(now))
        send(a, relay, B, f"final a {attempt}", now)
        send(b, relay, A, f"final b {attempt}", now)
        relay.flush(now)
        if (received(relay, B) or [""])[-1] == f"final a {attempt}" and (
            received(relay, A) or [""]
        )[-1] == f"final b {attempt}":
            break
    assert attempt <= 2, "the pair did not heal"
    assert a.contact(B).current.keys == b.contact(A).current.keys


def test_own_offer_goes_above_the_answered_epochs() -> None:
    """A answered B's rekey (tentative epoch 2) and a forged stale OFFER (epoch 1,
    answered tentatively and never promoted).  A's own rekey then offers epoch 3:
    at 2 both would answer each other's offer and complete different keys for
    the same epoch (found by test_forged_and_replayed_offers_never_break_the_pair)."""
    a, b, relay = pair()
    (offer,) = b.start_kex(A, 2.0)
    relay.post(A, a.handle_blob(B, offer.msg_id, offer.blob, 2.0))
    (answer,) = a.handle_blob(B, b"s" * 16, forged_offer(b, 1), 2.5)
    assert isinstance(answer, SendBlob)
    accept = parse_blob(answer.blob)
    assert isinstance(accept, Accept) and accept.epoch == 1
    (own,) = a.start_kex(B, 2.6)
    assert isinstance(own, SendBlob) and parse_blob(own.blob).epoch == 3
    relay.post(A, [answer, own])
    relay.flush(3.0)
    assert a.contact(B).epoch == b.contact(A).epoch == 3
    assert a.contact(B).current.keys == b.contact(A).current.keys
    send(a, relay, B, "x", 4.0)
    send(b, relay, A, "y", 4.0)
    relay.flush(4.0)
    assert received(relay, B) == ["x"] and received(relay, A) == ["y"]


def test_a_stuck_offer_is_replaced_by_a_fresh_one() -> None:
    """An OFFER never answered after every retry (the peer may be unable to take
    it, e.g. beyond its jump limit) no longer blocks /rekey and self-healing."""
    a = make_core(A)
    (offer,) = a.start_kex(B, 0.0)
    assert a.start_kex(B, 1.0) == []  # pending and not yet stuck: nothing new
    now = 0.0
    for _ in range(10):
        if a.contact(B).kex.pending.reported:
            break
        now += KEX_TIMEOUT
        a.tick(now)
    assert a.contact(B).kex.pending.reported
    (fresh,) = a.start_kex(B, now + 1.0)
    assert isinstance(fresh, SendBlob) and fresh.blob != offer.blob
    assert a.contact(B).kex.pending.blob == fresh.blob


def test_held_blobs_are_bounded_over_all_contacts() -> None:
    """A server can send blobs under any sender id, each held for want of keys:
    past MAX_HELD_BYTES over all contacts a new one is dropped, not kept, and
    the bound survives a save and reload of the state."""
    from enclaves.client.contacts import MAX_HELD, MAX_HELD_BYTES

    a = make_core(A)
    bogus = b"\x01" + (7).to_bytes(4, "big") + bytes(8000)  # an epoch nobody has
    per_sender = MAX_HELD // 2
    kept = dropped = 0
    enough = 2 * MAX_HELD_BYTES // (len(bogus) * per_sender)  # twice what fits: bounded
    for sender in range(5001, 5001 + enough):
        if dropped:
            break
        for n in range(per_sender):
            msg_id = sender.to_bytes(8, "big") + n.to_bytes(8, "big")
            events = a.handle_blob(sender, msg_id, bogus, 1.0)
            if any(isinstance(e, BlobDropped) for e in events):
                (event,) = [e for e in events if isinstance(e, BlobDropped)]
                assert event.reason == "too many held for all contacts"
                dropped += 1
                break
            kept += 1
    assert dropped == 1
    held = sum(len(c.held) for c in a.contacts())
    assert held == kept and held * len(bogus) <= MAX_HELD_BYTES < (held + 1) * len(bogus)
    again = ClientCore(a.state(), entropy=a._entropy)
    msg_id = b"\xff" * 16
    events = again.handle_blob(sender + 1, msg_id, bogus, 1.0)  # (and a healing OFFER)
    assert BlobDropped in {type(e) for e in events} and BlobHeld not in {type(e) for e in events}


def test_contacts_are_bounded() -> None:
    """The server names users (DIRECTORY, JOINED, DELIVER senders): a keystore
    keeps at most max_contacts; past that the directory's rest is ignored and a
    blob from yet another id is dropped, both with a log line."""
    a = make_core(A, max_contacts=3)
    a.on_directory([A, B, C, 400, 500], 1.0, start_kex=False)
    assert [c.user_id for c in a.contacts()] == [B, C, 400]
    bogus = b"\x01" + (7).to_bytes(4, "big") + bytes(64)
    (event,) = a.handle_blob(600, b"6" * 16, bogus, 1.0)
    assert event == BlobDropped(600, b"6" * 16, "too many contacts")
    with pytest.raises(ContactError, match="at most 3 contacts"):
        a.add_contact(700)
    assert a.add_contact(B).user_id == B  # known ones are still fine


def test_answers_to_forged_offers_do_not_pile_up_in_the_outbox() -> None:
    """Every OFFER is answered with an ACCEPT that waits in the outbox (and so in
    the keystore) until the server says ACCEPTED.  A server that forges OFFERs
    (or replays one under new msg_ids) and never says ACCEPTED, or refuses each
    answer, must not make the outbox grow without bound: an answer sent again
    replaces its earlier copy, and at most MAX_ANSWERS answers per contact are
    kept, the oldest dropped.  The real answer among them still completes."""
    from enclaves.client.core import MAX_ANSWERS

    a, b = make_core(A), make_core(B)
    (real_offer,) = a.start_kex(B, 0.0)
    (real_accept,) = [e for e in b.handle_blob(A, b"o" * 16, real_offer.blob, 1.0)
                      if isinstance(e, SendBlob)]  # fmt: skip
    replayed = forged_offer(a, 2)
    for n in range(50):  # the same forged OFFER again and again
        b.handle_blob(A, b"r" + n.to_bytes(15, "big"), replayed, 2.0)
    for n in range(50):  # fresh forged OFFERs; half the answers refused
        events = b.handle_blob(A, b"f" + n.to_bytes(15, "big"), forged_offer(a, 2 + n % 3), 3.0)
        (answer,) = [e for e in events if isinstance(e, SendBlob)]
        if n % 2:
            b.on_refused(answer.msg_id, "the recipient's mailbox on the server is full")
    answers = [e for e in b.outbox() if e.recipient == A]
    assert len(answers) <= MAX_ANSWERS
    assert len({e.blob for e in answers}) == len(answers)
    assert len(encode_state(b.state())) < 20_000
    # Kept across a save and reload, and the real exchange still completes
    # (the real ACCEPT may have been dropped from B's outbox: A's retry of its
    # OFFER is answered again).
    b = ClientCore(decode_state(encode_state(b.state())), entropy=b._entropy)
    relay = Relay(a, b)
    relay.post(A, a.tick(KEX_TIMEOUT + 1.0))
    relay.flush(KEX_TIMEOUT + 2.0)
    assert a.contact(B).epoch >= 1 and b.contact(A).current is not None
    assert real_accept.recipient == A
    send(a, relay, B, "through", KEX_TIMEOUT + 3.0)
    send(b, relay, A, "and back", KEX_TIMEOUT + 3.0)
    relay.flush(KEX_TIMEOUT + 4.0)
    assert received(relay, B)[-1] == "through" and received(relay, A)[-1] == "and back"


def test_importing_the_known_key_in_person_rejects_a_forged_key_change() -> None:
    """The server injects one OFFER as A under an identity key of its own: B
    blocks sending to A.  Sending must not stay blocked for good with
    accepting the server's key as the only way out: importing A's key in
    person — the one B already holds — proves the change false.  The pending
    key and the blobs held under it go, trust is ``in person``, and B sends
    again under the working keys, which A reads.  The same forged key sent
    again raises the alarm again."""
    a, b, relay = pair()
    fake = Entropy().x25519()
    forged = kex.make_offer(kex.Identity(A, fake, x25519_public(fake)), 2, Entropy(), 0.0).blob
    (alert, held) = b.handle_blob(A, b"F" * 16, forged, 2.0)
    assert isinstance(alert, IdentityKeyChanged) and isinstance(held, BlobHeld)
    assert isinstance(b.encrypt_message(A, "blocked", 3.0, confirmed=True), Refused)
    assert b.import_ik(A, a.own_ik_text(), 4.0) == []
    contact = b.contact(A)
    assert contact.pending_ik is None and contact.held == ()
    assert contact.trust is Trust.IN_PERSON and contact.ik == a.identity.public
    send(b, relay, A, "not blocked", 5.0)
    relay.flush(5.5)
    assert received(relay, A) == ["not blocked"]
    again = b.handle_blob(A, b"G" * 16, forged, 6.0)
    assert IdentityKeyChanged in {type(e) for e in again}


def _sealed_text(core: ClientCore, to: int, body: bytes, counter: int) -> bytes:
    """A MESSAGE with any body, sealed as ``core`` would for ``to``: what a peer
    running another client (or a server in the middle of an unverified pair)
    can send."""
    from enclaves.client.e2e import ContentType, Plaintext, seal_message
    from enclaves.crypto import Sealer

    current = core.contact(to).current
    assert current is not None
    plain = Plaintext(ContentType.TEXT, counter, 5000, body)
    return seal_message(Sealer(current.keys), current.epoch, core.user_id, to, plain)


def test_a_text_longer_than_allowed_is_cut_to_the_limit_with_a_count() -> None:
    """The reference client never sends more than MAX_TEXT bytes; more from a
    peer is kept up to the limit (a character split by the cut goes too) and
    the event says how much was dropped."""
    from enclaves.client.core import MAX_TEXT

    a, b, _relay = pair()
    body = b"a" * (MAX_TEXT - 1) + "é".encode() + b"z" * 9  # é straddles the limit
    (event,) = b.handle_blob(A, b"\x01" * 16, _sealed_text(a, B, body, 7), 5.0)
    assert isinstance(event, MessageReceived)
    assert (event.text, event.cut) == ("a" * (MAX_TEXT - 1), 10)
    assert b.history(A)[-1].text == event.text
    # At the limit exactly, nothing is cut.
    body = "é".encode() * (MAX_TEXT // 2)
    (event,) = b.handle_blob(A, b"\x02" * 16, _sealed_text(a, B, body, 8), 5.0)
    assert (len(event.text), event.cut) == (MAX_TEXT // 2, 0)


def test_history_text_is_bounded_per_contact_oldest_first() -> None:
    """Lines of MAX_TEXT each: after MAX_HISTORY_TEXT characters the oldest go,
    in and out alike, also after a restart from the saved state."""
    from enclaves.client.core import MAX_HISTORY_TEXT, MAX_TEXT

    a, b, relay = pair()
    room = MAX_HISTORY_TEXT // MAX_TEXT
    for i in range(room + 3):
        send(a, relay, B, f"{i:04d}" + "x" * (MAX_TEXT - 4), 2.0 + i)
    relay.flush(100.0)
    for core in (a, b):
        lines = core.history(B if core is a else A)
        assert [h.text[:4] for h in lines] == [f"{i:04d}" for i in range(3, room + 3)]
        assert sum(len(h.text) for h in lines) <= MAX_HISTORY_TEXT
    restarted = ClientCore(decode_state(encode_state(b.state())))
    relay.cores[B] = b = restarted
    send(a, relay, B, "short", 200.0)
    relay.flush(201.0)
    lines = b.history(A)
    assert lines[-1].text == "short" and lines[0].text[:4] == "0004"
    assert sum(len(h.text) for h in lines) <= MAX_HISTORY_TEXT


def test_a_receipt_naming_a_received_message_changes_nothing() -> None:
    """DELIVERED is about what we sent: one naming a message we received
    (a server's forgery) is not reported, and a received line sharing an id
    with a sent one does not hide the sent one's status."""
    a, b, relay = pair()
    sent = send(a, relay, B, "out", 2.0)
    relay.flush(3.0)
    (got,) = relay.of(B, MessageReceived)
    assert b.on_delivered(got.msg_id) is None
    # The server delivers to A a message of B's under A's own msg_id.
    reply = b.encrypt_message(A, "in", 4.0, confirmed=True)
    assert isinstance(reply, SendBlob)
    a.handle_blob(B, sent.msg_id, reply.blob, 4.0)
    assert a.on_delivered(sent.msg_id) == B
    assert [(h.direction, h.status) for h in a.history(B)] == [
        ("out", "delivered"),
        ("in", "received"),
    ]


def test_a_message_under_epoch_0_is_dropped_as_such() -> None:
    """Epoch 0 never has keys: such a blob is not "under keys deleted"."""
    _a, b, _relay = pair()
    blob = bytes([1]) + (0).to_bytes(4, "big") + bytes(80)
    (event,) = b.handle_blob(A, b"\x07" * 16, blob, 3.0)
    assert event == BlobDropped(A, b"\x07" * 16, "epoch 0 never has keys")
