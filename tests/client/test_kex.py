"""The hybrid KEX: derivation, confirmation, the per-pair state machine, fixed vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves.client import kex
from enclaves.client.blob import Accept, Offer, parse_blob
from enclaves.client.kex import (
    Entropy,
    Identity,
    KexError,
    KexState,
    PendingOffer,
    SeededEntropy,
    answer_offer,
    complete_offer,
    make_offer,
)
from enclaves.crypto import sha256
from tests.client.helpers import identity

VECTOR_FILE = Path(__file__).parent / "vectors" / "kex_v1.json"
ID_A, ID_B = 0x1111111111111111, 0x2222222222222222


@pytest.fixture
def alice() -> Identity:
    return identity(ID_A, b"alice")


@pytest.fixture
def bob() -> Identity:
    return identity(ID_B, b"bob")


def exchange(alice: Identity, bob: Identity, epoch: int = 1) -> tuple[PendingOffer, Accept, object]:
    pending = make_offer(alice, epoch, SeededEntropy(b"a-eph"), now=0.0)
    offer = parse_blob(pending.blob)
    assert isinstance(offer, Offer)
    accept, keys_b = answer_offer(bob, ID_A, offer, SeededEntropy(b"b-eph"))
    return pending, accept, keys_b


def test_both_sides_derive_the_same_keys(alice: Identity, bob: Identity) -> None:
    pending, accept, keys_b = exchange(alice, bob)
    keys_a = complete_offer(alice, ID_B, pending, parse_blob(accept.to_bytes()))
    assert keys_a == keys_b
    assert keys_a.enc != keys_a.auth


def test_blob_sizes(alice: Identity, bob: Identity) -> None:
    pending, accept, _ = exchange(alice, bob)
    assert len(pending.blob) == 1253 and pending.blob[0] == 0x02
    assert len(accept.to_bytes()) == 1173 and accept.to_bytes()[0] == 0x03


@pytest.mark.parametrize("part", ["ct", "ek", "ik", "confirm"])
def test_tampered_accept_fails_confirmation(alice: Identity, bob: Identity, part: str) -> None:
    pending, accept, _ = exchange(alice, bob)
    value = bytearray(getattr(accept, part))
    value[len(value) // 2] ^= 0x01
    forged = Accept(**{**_fields(accept), part: bytes(value)})
    with pytest.raises(KexError):
        complete_offer(alice, ID_B, pending, forged)


def test_substituted_accept_keys_fail(alice: Identity, bob: Identity) -> None:
    """A server swapping in its own EK_B (or IK_B) can not pass confirmation."""
    pending, accept, _ = exchange(alice, bob)
    mallory = identity(ID_B, b"mallory")
    forged_ek = Accept(
        **{**_fields(accept), "ek": Entropy().x25519().public_key().public_bytes_raw()}
    )
    forged_ik = Accept(**{**_fields(accept), "ik": mallory.public})
    for forged in (forged_ek, forged_ik):
        with pytest.raises(KexError):
            complete_offer(alice, ID_B, pending, forged)


@pytest.mark.parametrize("part", ["pq", "ek"])
def test_substituted_offer_key_fails_confirmation(
    alice: Identity, bob: Identity, part: str
) -> None:
    """The server replaces PQ_A (or EK_A) with its own: Alice's confirmation check fails."""
    pending = make_offer(alice, 1, SeededEntropy(b"a-eph"), now=0.0)
    offer = parse_blob(pending.blob)
    evil = make_offer(alice, 1, SeededEntropy(b"server"), now=0.0)
    evil_offer = parse_blob(evil.blob)
    forged = Offer(**{**_fields(offer), part: getattr(evil_offer, part)})
    accept, _ = answer_offer(bob, ID_A, forged, SeededEntropy(b"b-eph"))
    with pytest.raises(KexError):
        complete_offer(alice, ID_B, pending, accept)


def test_ids_and_epoch_are_bound(alice: Identity, bob: Identity) -> None:
    pending, accept, _ = exchange(alice, bob)
    # Bob believed the offer came from someone else: transcripts differ.
    offer = parse_blob(pending.blob)
    accept_other, _ = answer_offer(bob, ID_A + 1, offer, SeededEntropy(b"b-eph"))
    with pytest.raises(KexError):
        complete_offer(alice, ID_B, pending, accept_other)
    with pytest.raises(KexError):
        complete_offer(alice, ID_B, pending, Accept(**{**_fields(accept), "epoch": 2}))


def test_low_order_point_is_refused(alice: Identity, bob: Identity) -> None:
    pending = make_offer(alice, 1, SeededEntropy(b"a-eph"), now=0.0)
    offer = parse_blob(pending.blob)
    with pytest.raises(KexError):
        answer_offer(bob, ID_A, Offer(**{**_fields(offer), "ek": bytes(32)}), Entropy())


def test_pending_offer_keeps_no_key_objects(alice: Identity) -> None:
    pending = make_offer(alice, 1, Entropy(), now=0.0)
    assert "ek_private" not in repr(pending) and pending.ek_private.hex() not in repr(pending)


def _fields(value: object) -> dict[str, object]:
    return attrs.asdict(value, recurse=False)  # type: ignore[arg-type]


# -- state machine ----------------------------------------------------------------


def test_offer_answer_complete(alice: Identity, bob: Identity) -> None:
    step_a = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    assert step_a.outcome == "offered" and step_a.state.pending is not None
    step_b = kex.on_offer(KexState(), bob, ID_A, parse_blob(step_a.send), 0, Entropy(), 0.0)
    assert step_b.outcome == "answered" and step_b.new_epoch == 1
    done = kex.on_accept(step_a.state, alice, ID_B, parse_blob(step_b.send))
    assert done.outcome == "completed" and done.new_epoch == 1
    assert done.new_keys == step_b.new_keys
    assert done.state.pending is None  # ephemeral secrets gone


def test_start_while_pending_resends_nothing_new(alice: Identity) -> None:
    step = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    again = kex.start(step.state, alice, 0, SeededEntropy(b"x"), now=1.0)
    assert again.outcome == "already pending" and again.state == step.state


@pytest.mark.parametrize("current", [0, 5])
def test_crossing_offers_converge(alice: Identity, bob: Identity, current: int) -> None:
    """Both offer the same epoch at once: the lower id's offer wins on both sides."""
    a = kex.start(KexState(), alice, current, SeededEntropy(b"a"), now=0.0)
    b = kex.start(KexState(), bob, current, SeededEntropy(b"b"), now=0.0)
    # Each receives the other's offer while its own is pending.
    a2 = kex.on_offer(a.state, alice, ID_B, parse_blob(b.send), current, Entropy(), 1.0)
    b2 = kex.on_offer(b.state, bob, ID_A, parse_blob(a.send), current, Entropy(), 1.0)
    assert ID_A < ID_B
    assert a2.outcome == "crossing won" and a2.send is None and a2.new_keys is None
    assert b2.outcome == "crossing lost" and b2.new_epoch == current + 1
    # Bob's keys are receive-only while a working pair exists (current > 0).
    assert b2.tentative is (current > 0)
    # Bob keeps his own offer: the OFFER he answered might have been forged.  The
    # core drops it once Alice's KEY_CONFIRM authenticates under that epoch.
    assert b2.state.pending == b.state.pending
    a3 = kex.on_accept(a2.state, alice, ID_B, parse_blob(b2.send))
    assert a3.outcome == "completed" and a3.new_keys == b2.new_keys
    assert a3.state.pending is None and not a3.tentative


def test_duplicate_offer_gets_the_same_accept(alice: Identity, bob: Identity) -> None:
    a = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    b = kex.on_offer(KexState(), bob, ID_A, parse_blob(a.send), 0, Entropy(), 0.0)
    again = kex.on_offer(b.state, bob, ID_A, parse_blob(a.send), 1, Entropy(), 5.0)
    assert again.outcome == "answer resent" and again.send == b.send and again.new_keys is None


def test_stale_offer_is_answered_with_tentative_keys(alice: Identity, bob: Identity) -> None:
    """Bob is already at epoch 3 (e.g. Alice restored an old backup, or the server
    pushed Bob's epoch ahead): her OFFER for epoch 1 is answered, tentatively —
    only the real Alice can complete it and promote the keys with a KEY_CONFIRM."""
    a = kex.start(KexState(), alice, 0, SeededEntropy(b"old"), now=0.0)
    step = kex.on_offer(KexState(), bob, ID_A, parse_blob(a.send), 3, Entropy(), 0.0)
    assert step.outcome == "answered" and step.tentative and step.new_epoch == 1
    accept = parse_blob(step.send)
    assert isinstance(accept, Accept) and accept.epoch == 1
    done = kex.on_accept(a.state, alice, ID_B, accept)
    assert done.outcome == "completed" and done.new_keys == step.new_keys


def test_offer_for_epoch_0_is_refused(alice: Identity, bob: Identity) -> None:
    a = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    zero = parse_blob(a.send[:1] + bytes(4) + a.send[5:])
    step = kex.on_offer(KexState(), bob, ID_A, zero, 3, Entropy(), 0.0)
    assert step.outcome == "bad offer" and step.send is None and step.new_keys is None


def test_rekey_offers_next_epoch(alice: Identity) -> None:
    step = kex.start(KexState(), alice, 7, SeededEntropy(b"a"), now=0.0)
    assert parse_blob(step.send).epoch == 8


def test_timeout_retries_then_reports_once(alice: Identity, bob: Identity) -> None:
    a = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    state = a.state
    assert kex.tick(state, 10.0, timeout=60, max_offers=3).outcome == "idle"
    outcomes = []
    for now in (60.0, 120.0, 180.0, 240.0, 300.0):
        step = kex.tick(state, now, timeout=60, max_offers=3)
        outcomes.append(step.outcome)
        if step.send is not None:
            assert step.send == a.send  # the same offer: a late ACCEPT for any copy works
        state = step.state
    assert outcomes == ["retry", "retry", "stuck", "idle", "idle"]
    b = kex.on_offer(KexState(), bob, ID_A, parse_blob(a.send), 0, Entropy(), 400.0)
    assert kex.on_accept(state, alice, ID_B, parse_blob(b.send)).outcome == "completed"


def test_confirm_failure_drops_only_that_accept(alice: Identity, bob: Identity) -> None:
    """A forged or tampered ACCEPT must not cancel the real exchange: the offer
    (and its ephemeral secrets) stays pending and the genuine ACCEPT completes it."""
    a = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    b = kex.on_offer(KexState(), bob, ID_A, parse_blob(a.send), 0, Entropy(), 0.0)
    bad = bytearray(b.send)
    bad[100] ^= 0x80  # inside ct
    step = kex.on_accept(a.state, alice, ID_B, parse_blob(bytes(bad)))
    assert step.outcome == "confirm failed" and step.new_keys is None
    assert step.state == a.state and step.state.pending is not None
    done = kex.on_accept(step.state, alice, ID_B, parse_blob(b.send))
    assert done.outcome == "completed" and done.new_keys == b.new_keys
    assert done.state.pending is None


@pytest.mark.parametrize(("current", "tentative"), [(0, False), (1, True), (7, True)])
def test_answer_is_tentative_only_with_a_working_pair(
    alice: Identity, bob: Identity, current: int, tentative: bool
) -> None:
    """An OFFER proves nothing (IK_A is public): with pair keys in place the answer's
    keys are receive-only; on the first exchange there is nothing to protect."""
    a = kex.start(KexState(), alice, current, SeededEntropy(b"a"), now=0.0)
    b = kex.on_offer(KexState(), bob, ID_A, parse_blob(a.send), current, Entropy(), 0.0)
    assert b.outcome == "answered" and b.new_epoch == current + 1 and b.tentative is tentative
    done = kex.on_accept(a.state, alice, ID_B, parse_blob(b.send), current)
    assert done.outcome == "completed" and not done.tentative


def test_answering_a_forged_offer_keeps_our_own(alice: Identity, bob: Identity) -> None:
    """Bob (with keys) rekeys; a forged higher OFFER under Alice's key is answered
    but does not cancel Bob's offer, whose genuine ACCEPT still completes."""
    mine = kex.start(KexState(), bob, 3, SeededEntropy(b"b"), now=0.0)
    forger = Identity(ID_A, Entropy().x25519(), alice.public)
    forged = parse_blob(make_offer(forger, 6, Entropy(), 0.0).blob)
    step = kex.on_offer(mine.state, bob, ID_A, forged, 3, Entropy(), 1.0)
    assert step.outcome == "crossing lost" and step.tentative
    assert step.state.pending == mine.state.pending
    real = kex.on_offer(KexState(), alice, ID_B, parse_blob(mine.send), 3, Entropy(), 1.0)
    done = kex.on_accept(step.state, bob, ID_A, parse_blob(real.send), 3)
    assert done.outcome == "completed" and done.new_keys == real.new_keys


def test_first_exchange_drops_a_lower_offer_of_ours(alice: Identity, bob: Identity) -> None:
    """Without keys, answering a higher epoch adopts it at once: our lower offer
    could only move the pair backwards, so it goes."""
    mine = kex.start(KexState(), bob, 0, SeededEntropy(b"b"), now=0.0)
    theirs = kex.start(KexState(), alice, 1, SeededEntropy(b"a"), now=0.0)
    step = kex.on_offer(mine.state, bob, ID_A, parse_blob(theirs.send), 0, Entropy(), 1.0)
    assert step.outcome == "crossing lost" and not step.tentative
    assert step.state.pending is None


def test_accept_for_an_offer_below_current_is_stale(alice: Identity, bob: Identity) -> None:
    a = kex.start(KexState(), alice, 0, SeededEntropy(b"a"), now=0.0)
    b = kex.on_offer(KexState(), bob, ID_A, parse_blob(a.send), 0, Entropy(), 0.0)
    late = kex.on_accept(a.state, alice, ID_B, parse_blob(b.send), current_epoch=2)
    assert late.outcome == "stale" and late.new_keys is None and late.state.pending is None


# -- fixed byte vectors ------------------------------------------------------------


class _VectorEntropy(Entropy):
    """Fixed X25519 keys and a recorded encapsulation, to replay the vector."""

    def __init__(self, x25519_keys: list[bytes], ss: bytes, ct: bytes) -> None:
        self._keys = list(x25519_keys)
        self._ss, self._ct = ss, ct

    def x25519(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self._keys.pop(0))

    def mlkem(self) -> MLKEM768PrivateKey:
        raise AssertionError("not used")

    def encapsulate(self, public: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        return self._ss, self._ct


def generate_vector() -> dict[str, object]:
    """Run once to make tests/client/vectors/kex_v1.json (encapsulation is random)."""
    ik_a, ik_b = bytes(range(1, 33)), bytes(range(33, 65))
    ek_a, ek_b = bytes(range(65, 97)), bytes(range(97, 129))
    seed = bytes(range(128, 192))
    alice = Identity.from_private_bytes(ID_A, ik_a)
    bob = Identity.from_private_bytes(ID_B, ik_b)
    pq = MLKEM768PrivateKey.from_seed_bytes(seed)
    ss, ct = pq.public_key().encapsulate()
    offer = Offer(
        3,
        alice.public,
        X25519PrivateKey.from_private_bytes(ek_a).public_key().public_bytes_raw(),
        pq.public_key().public_bytes_raw(),
    )
    accept, keys = answer_offer(bob, ID_A, offer, _VectorEntropy([ek_b], ss, ct))
    script = kex.transcript(
        ID_A, ID_B, 3, offer.ik, offer.ek, offer.pq, accept.ik, accept.ek, accept.ct
    )
    return {
        "comment": "Enclaves KEX v1: A=initiator. ML-KEM-768 key from seed; ct recorded.",
        "id_a": str(ID_A),
        "id_b": str(ID_B),
        "epoch": 3,
        "ik_a_private": ik_a.hex(),
        "ik_b_private": ik_b.hex(),
        "ek_a_private": ek_a.hex(),
        "ek_b_private": ek_b.hex(),
        "pq_seed": seed.hex(),
        "ct": ct.hex(),
        "ss_pq": ss.hex(),
        "transcript_sha256": sha256(script).hex(),
        "pair_enc": keys.enc.hex(),
        "pair_auth": keys.auth.hex(),
        "confirm": accept.confirm.hex(),
        "offer": offer.to_bytes().hex(),
        "accept": accept.to_bytes().hex(),
    }


@pytest.fixture(scope="module")
def vector() -> dict[str, str]:
    return json.loads(VECTOR_FILE.read_text())


def test_vector_decapsulation(vector: dict[str, str]) -> None:
    pq = MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(vector["pq_seed"]))
    assert pq.decapsulate(bytes.fromhex(vector["ct"])) == bytes.fromhex(vector["ss_pq"])
    assert bytes.fromhex(vector["offer"])[69:] == pq.public_key().public_bytes_raw()


def test_vector_initiator_side(vector: dict[str, str]) -> None:
    alice = Identity.from_private_bytes(int(vector["id_a"]), bytes.fromhex(vector["ik_a_private"]))
    pending = PendingOffer(
        epoch=int(vector["epoch"]),
        ek_private=bytes.fromhex(vector["ek_a_private"]),
        pq_seed=bytes.fromhex(vector["pq_seed"]),
        blob=bytes.fromhex(vector["offer"]),
        first_sent=0.0,
        last_sent=0.0,
    )
    accept = parse_blob(bytes.fromhex(vector["accept"]))
    assert isinstance(accept, Accept)
    assert accept.confirm.hex() == vector["confirm"]
    keys = complete_offer(alice, int(vector["id_b"]), pending, accept)
    assert keys.enc.hex() == vector["pair_enc"]
    assert keys.auth.hex() == vector["pair_auth"]
    script = kex.transcript(
        alice.user_id, int(vector["id_b"]), pending.epoch, alice.public,
        pending.blob[37:69], pending.blob[69:], accept.ik, accept.ek, accept.ct,
    )  # fmt: skip
    assert sha256(script).hex() == vector["transcript_sha256"]


def test_vector_responder_side(vector: dict[str, str]) -> None:
    bob = Identity.from_private_bytes(int(vector["id_b"]), bytes.fromhex(vector["ik_b_private"]))
    offer = parse_blob(bytes.fromhex(vector["offer"]))
    assert isinstance(offer, Offer)
    entropy = _VectorEntropy(
        [bytes.fromhex(vector["ek_b_private"])],
        bytes.fromhex(vector["ss_pq"]),
        bytes.fromhex(vector["ct"]),
    )
    accept, keys = answer_offer(bob, int(vector["id_a"]), offer, entropy)
    assert accept.to_bytes().hex() == vector["accept"]
    assert keys.to_bytes().hex() == vector["pair_enc"] + vector["pair_auth"]


def test_vector_matches_the_spec_formula(vector: dict[str, str]) -> None:
    """Recompute the vector from docs/protocol.rst with raw primitives, not our code."""
    from cryptography.hazmat.primitives import cmac, hashes
    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def priv(name: str) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(vector[name]))

    ik_a, ik_b, ek_a, ek_b = (priv(n + "_private") for n in ("ik_a", "ik_b", "ek_a", "ek_b"))
    pub = {n: k.public_key() for n, k in (("ik_b", ik_b), ("ek_b", ek_b))}
    ikm = (
        ik_a.exchange(pub["ik_b"])
        + ik_a.exchange(pub["ek_b"])
        + ek_a.exchange(pub["ik_b"])
        + ek_a.exchange(pub["ek_b"])
        + bytes.fromhex(vector["ss_pq"])
    )
    offer, accept = bytes.fromhex(vector["offer"]), bytes.fromhex(vector["accept"])
    script = (
        int(vector["id_a"]).to_bytes(8, "big")
        + int(vector["id_b"]).to_bytes(8, "big")
        + offer[1:5]  # epoch
        + offer[5:]  # IK_A || EK_A || PQ_A
        + accept[5:-16]  # IK_B || EK_B || ct
    )
    assert hashlib.sha256(script).hexdigest() == vector["transcript_sha256"]
    okm = HKDF(hashes.SHA256(), 64, hashlib.sha256(script).digest(), b"enclaves/v1/pair").derive(
        ikm
    )
    assert okm.hex() == vector["pair_enc"] + vector["pair_auth"]
    mac = cmac.CMAC(algorithms.AES(okm[32:]))
    mac.update(b"enclaves/v1/confirm" + script)
    assert mac.finalize().hex() == vector["confirm"] == accept[-16:].hex()


def test_vector_tampered_ct_fails(vector: dict[str, str]) -> None:
    alice = Identity.from_private_bytes(int(vector["id_a"]), bytes.fromhex(vector["ik_a_private"]))
    pending = PendingOffer(
        int(vector["epoch"]), bytes.fromhex(vector["ek_a_private"]),
        bytes.fromhex(vector["pq_seed"]), bytes.fromhex(vector["offer"]), 0.0, 0.0,
    )  # fmt: skip
    raw = bytearray.fromhex(vector["accept"])
    raw[69 + 500] ^= 0x04  # a byte of ct
    with pytest.raises(KexError):
        complete_offer(alice, int(vector["id_b"]), pending, parse_blob(bytes(raw)))


if __name__ == "__main__":  # regenerate: python -m tests.client.test_kex
    VECTOR_FILE.write_text(json.dumps(generate_vector(), indent=2) + "\n")
