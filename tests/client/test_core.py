"""ClientCore end to end through an in-memory relay: enrollment, chat, trust, rekey."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaves.client.contacts import ContactError, Trust, encode_ik
from enclaves.client.core import (
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
from enclaves.client.state import decode_state, encode_state
from tests.client.helpers import Relay, make_core

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
    assert b.handle_blob(A, b"y" * 16, late.blob, 200.0) == [
        BlobDropped(A, b"y" * 16, "epoch keys deleted")
    ]


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
    events = a.handle_blob(B, accept.msg_id, bytes(bad), 2.0)
    assert [type(e) for e in events] == [KexFailed]
    assert a.contact(B).current is None and a.contact(B).kex.pending is None


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
    assert [type(e) for e in events] == [KexCompleted, MessageReceived]
    assert events[1].text == "early"


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
    assert restored.contact(B).epoch == b.contact(A).epoch == 4
    assert restored.contact(B).current.keys == b.contact(A).current.keys
    send(restored, relay, B, "back", 6.0)
    relay.flush(6.0)
    assert received(relay, B) == ["back"]


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
    for i, blob in enumerate((zero_ek, far)):
        events = b.handle_blob(A, bytes([i]) * 16, blob, 1.0)
        assert [type(e) for e in events] == [KexFailed]
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
