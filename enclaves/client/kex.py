"""Sans-IO hybrid X25519 + ML-KEM-768 key exchange (DESIGN.md §5, docs/protocol.rst).

A (the initiator) sends OFFER(epoch, IK_A, EK_A, PQ_A); B answers
ACCEPT(epoch, IK_B, EK_B, ct, confirm); A checks ``confirm`` in constant time
and adopts the new pair keys.  An OFFER proves nothing by itself (IK_A is
public), so when B already has working pair keys it keeps the new ones only
as *tentative* (``KexStep.tentative``): it receives with them but keeps
sending under the current epoch until A proves it holds them with a MESSAGE
(a KEY_CONFIRM) sealed under them.  The functions
here are pure: bytes and values in, values out.  :func:`on_offer`,
:func:`on_accept`, :func:`start` and :func:`tick` are the per-pair state
machine over a :class:`KexState`; the caller keeps the state (in the contact)
and persists it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from attrs import evolve, field, frozen
from cryptography.hazmat.primitives.asymmetric.mlkem import (
    MLKEM768PrivateKey,
    MLKEM768PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves.client.blob import MAX_EPOCH, Accept, Offer
from enclaves.crypto import CryptoError, KeyPair, Sealer, hkdf_sha256, sha256, x25519, x25519_public

__all__ = [
    "PAIR_INFO",
    "CONFIRM_LABEL",
    "KEX_TIMEOUT",
    "KEX_MAX_OFFERS",
    "MAX_EPOCH_JUMP",
    "KexError",
    "Entropy",
    "SeededEntropy",
    "Identity",
    "PendingOffer",
    "KexState",
    "KexStep",
    "transcript",
    "derive_pair",
    "confirm_tag",
    "make_offer",
    "answer_offer",
    "complete_offer",
    "start",
    "on_offer",
    "on_accept",
    "tick",
]

PAIR_INFO = b"enclaves/v1/pair"
CONFIRM_LABEL = b"enclaves/v1/confirm"
KEX_TIMEOUT = 600.0  # seconds before an unanswered OFFER is sent again
KEX_MAX_OFFERS = 3  # copies of one OFFER sent in all before it is reported stuck
MAX_EPOCH_JUMP = 1024  # an OFFER may skip at most this many epochs ahead of ours

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


class KexError(Exception):
    """The exchange failed (bad key, failed confirmation).  The text never varies."""

    def __init__(self) -> None:
        super().__init__("key exchange failed")


class Entropy:
    """Where fresh private keys and random ids come from (the OS by default).

    Tests inject :class:`SeededEntropy`.  ML-KEM encapsulation randomness can
    not be injected in ``cryptography``; :meth:`encapsulate` is the one place
    that draws it.
    """

    def random_bytes(self, size: int) -> bytes:
        return os.urandom(size)

    def x25519(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.random_bytes(32))

    def mlkem(self) -> MLKEM768PrivateKey:
        return MLKEM768PrivateKey.from_seed_bytes(self.random_bytes(64))

    def encapsulate(self, public: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        """``(shared_secret[32], ct[1088])``."""
        return public.encapsulate()


class SeededEntropy(Entropy):
    """Deterministic private keys and ids from a seed: for tests only."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def __repr__(self) -> str:
        return "<SeededEntropy>"

    def random_bytes(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            self._counter += 1
            out += hashlib.sha256(self._seed + _U64.pack(self._counter)).digest()
        return out[:size]


@frozen
class Identity:
    """This user's id and long-term X25519 identity key."""

    user_id: int
    private: X25519PrivateKey = field(repr=False)
    public: bytes = field(repr=lambda b: b[:4].hex() + "…")

    @classmethod
    def from_private_bytes(cls, user_id: int, raw: bytes) -> Identity:
        key = X25519PrivateKey.from_private_bytes(raw)
        return cls(user_id, key, x25519_public(key))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes_raw()


# -- derivation ----------------------------------------------------------------


def transcript(
    id_a: int,
    id_b: int,
    epoch: int,
    ik_a: bytes,
    ek_a: bytes,
    pq_a: bytes,
    ik_b: bytes,
    ek_b: bytes,
    ct: bytes,
) -> bytes:
    """``id_A u64 || id_B u64 || epoch u32 || IK_A || EK_A || PQ_A || IK_B || EK_B || ct``."""
    return (
        _U64.pack(id_a) + _U64.pack(id_b) + _U32.pack(epoch) + ik_a + ek_a + pq_a + ik_b + ek_b + ct
    )


def derive_pair(dh: tuple[bytes, bytes, bytes, bytes], ss_pq: bytes, script: bytes) -> KeyPair:
    """HKDF(ikm = DH1..DH4 || ss_pq, salt = SHA-256(transcript), info = "enclaves/v1/pair")."""
    okm = hkdf_sha256(b"".join(dh) + ss_pq, sha256(script), PAIR_INFO, 64)
    try:
        return KeyPair.from_bytes(okm)
    except ValueError:  # enc == auth: impossible in practice
        raise CryptoError() from None


def confirm_tag(keys: KeyPair, script: bytes) -> bytes:
    """``CMAC(pair.auth, "enclaves/v1/confirm" || transcript)``."""
    return Sealer(keys).mac(CONFIRM_LABEL, script)


# -- the three steps ---------------------------------------------------------------


@frozen
class PendingOffer:
    """An OFFER we sent and whose ACCEPT we wait for; holds its ephemeral secrets."""

    epoch: int
    ek_private: bytes = field(repr=False)
    pq_seed: bytes = field(repr=False)
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")
    first_sent: float
    last_sent: float
    offers_sent: int = 1
    reported: bool = False


def make_offer(identity: Identity, epoch: int, entropy: Entropy, now: float) -> PendingOffer:
    """A fresh OFFER for ``epoch`` with new EK_A and PQ_A."""
    if not 1 <= epoch <= MAX_EPOCH:
        raise KexError()
    ek = entropy.x25519()
    pq = entropy.mlkem()
    offer = Offer(epoch, identity.public, x25519_public(ek), pq.public_key().public_bytes_raw())
    return PendingOffer(
        epoch=epoch,
        ek_private=ek.private_bytes_raw(),
        pq_seed=pq.private_bytes_raw(),
        blob=offer.to_bytes(),
        first_sent=now,
        last_sent=now,
    )


def answer_offer(
    identity: Identity, peer_id: int, offer: Offer, entropy: Entropy
) -> tuple[Accept, KeyPair]:
    """B's side: the ACCEPT for ``offer`` and the new pair keys (EK_B is used and dropped)."""
    try:
        pq_public = MLKEM768PublicKey.from_public_bytes(offer.pq)
        ek = entropy.x25519()
        ek_public = x25519_public(ek)
        ss_pq, ct = entropy.encapsulate(pq_public)
        dh = (
            x25519(identity.private, offer.ik),  # DH(IK_A, IK_B)
            x25519(ek, offer.ik),  # DH(IK_A, EK_B)
            x25519(identity.private, offer.ek),  # DH(EK_A, IK_B)
            x25519(ek, offer.ek),  # DH(EK_A, EK_B)
        )
        del ek
        script = transcript(
            peer_id, identity.user_id, offer.epoch, offer.ik, offer.ek, offer.pq,
            identity.public, ek_public, ct,
        )  # fmt: skip
        keys = derive_pair(dh, ss_pq, script)
    except (CryptoError, ValueError):
        raise KexError() from None
    accept = Accept(offer.epoch, identity.public, ek_public, ct, confirm_tag(keys, script))
    return accept, keys


def complete_offer(
    identity: Identity, peer_id: int, pending: PendingOffer, accept: Accept
) -> KeyPair:
    """A's side: derive from ``accept`` and check ``confirm`` in constant time."""
    if accept.epoch != pending.epoch:
        raise KexError()
    offer_ek = pending.blob[5 + 32 : 5 + 64]
    offer_pq = pending.blob[5 + 64 :]
    try:
        ek = X25519PrivateKey.from_private_bytes(pending.ek_private)
        pq = MLKEM768PrivateKey.from_seed_bytes(pending.pq_seed)
        ss_pq = pq.decapsulate(accept.ct)
        dh = (
            x25519(identity.private, accept.ik),  # DH(IK_A, IK_B)
            x25519(identity.private, accept.ek),  # DH(IK_A, EK_B)
            x25519(ek, accept.ik),  # DH(EK_A, IK_B)
            x25519(ek, accept.ek),  # DH(EK_A, EK_B)
        )
        del ek, pq
        script = transcript(
            identity.user_id, peer_id, pending.epoch, identity.public, offer_ek, offer_pq,
            accept.ik, accept.ek, accept.ct,
        )  # fmt: skip
        keys = derive_pair(dh, ss_pq, script)
    except (CryptoError, ValueError):
        raise KexError() from None
    if not hmac.compare_digest(confirm_tag(keys, script), accept.confirm):
        raise KexError()
    return keys


# -- the per-pair state machine ---------------------------------------------------


@frozen
class KexState:
    """Per-contact KEX state: our outstanding OFFER and the last OFFER we answered."""

    pending: PendingOffer | None = None
    answered_digest: bytes | None = field(default=None, repr=False)
    answered_blob: bytes | None = field(default=None, repr=False)


@frozen
class KexStep:
    """What one input did: the new state, a blob to send, keys to adopt, and why.

    ``outcome`` is one of: ``offered``, ``already pending``, ``answered``,
    ``answer resent``, ``crossing lost`` (we answered theirs; ours stays
    pending unless it can no longer complete, see :func:`on_offer`),
    ``crossing won`` (their offer ignored: ours stands), ``stale`` (ignored), ``bad offer``
    (dropped), ``completed``, ``confirm failed`` (that ACCEPT dropped, our
    offer still pending), ``retry``, ``stuck`` (reported once), ``idle``,
    ``epochs exhausted`` (2**32 - 1 reached: no more rekeys).

    ``tentative`` is set when ``new_keys`` come from answering an OFFER while
    the pair already has keys (``current_epoch > 0``): nothing yet proves
    that the OFFER came from the peer, so the caller may open messages with
    them but must keep sending under its current keys until a MESSAGE from
    the peer authenticates under the new ones.  On the very first exchange
    there is no working pair to protect and the keys are used at once.
    """

    state: KexState
    outcome: str
    send: bytes | None = field(default=None, repr=False)
    new_epoch: int | None = None
    new_keys: KeyPair | None = field(default=None, repr=False)
    tentative: bool = False


def start(
    state: KexState, identity: Identity, current_epoch: int, entropy: Entropy, now: float
) -> KexStep:
    """Begin a KEX (first or rekey) at ``current_epoch + 1`` unless one is pending.

    With tentative keys the caller passes the highest epoch it answered (see
    :attr:`Contact.offer_floor <enclaves.client.contacts.Contact.offer_floor>`)."""
    if state.pending is not None:
        return KexStep(state, "already pending", send=state.pending.blob)
    if current_epoch >= MAX_EPOCH:
        return KexStep(state, "epochs exhausted")
    pending = make_offer(identity, current_epoch + 1, entropy, now)
    return KexStep(evolve(state, pending=pending), "offered", send=pending.blob)


def _answer(
    state: KexState,
    identity: Identity,
    peer_id: int,
    offer: Offer,
    raw: bytes,
    entropy: Entropy,
    outcome: str,
    current_epoch: int,
) -> KexStep:
    try:
        accept, keys = answer_offer(identity, peer_id, offer, entropy)
    except KexError:
        return KexStep(state, "bad offer")
    blob = accept.to_bytes()
    # Our own outstanding offer is kept where its ACCEPT could still be the one
    # that counts: the OFFER we answer may be forged, and must not cancel ours.
    # With pair keys in place ours is of a higher epoch than current, and a
    # same-epoch one may replace a forged first exchange; only a first
    # exchange at a lower epoch than the one answered is dropped (completing
    # it would move the pair backwards).
    pending = state.pending
    if pending is not None and current_epoch == 0 and pending.epoch != offer.epoch:
        pending = None
    new_state = KexState(pending=pending, answered_digest=sha256(raw), answered_blob=blob)
    return KexStep(
        new_state,
        outcome,
        send=blob,
        new_epoch=offer.epoch,
        new_keys=keys,
        tentative=current_epoch > 0,
    )


def on_offer(
    state: KexState,
    identity: Identity,
    peer_id: int,
    offer: Offer,
    current_epoch: int,
    entropy: Entropy,
    now: float,
) -> KexStep:
    """Handle an OFFER whose IK the caller has already matched to the contact.

    - the OFFER we last answered, again: the same ACCEPT is sent again;
    - epoch above ours and no offer of ours at that epoch or above: answer
      (with ``tentative`` keys if ``current_epoch > 0``, see :class:`KexStep`);
    - both offered the same epoch (crossing): the offer of the lower user id
      wins; the other side answers it.  It keeps its own offer pending (an
      OFFER can be forged: answering one must not cancel a real exchange);
      the caller drops it once a MESSAGE from the peer authenticates under
      an epoch at or above it.  On a first exchange an offer of ours below
      the answered epoch is dropped;
    - epoch not above ours (stale, replayed or forged, or a peer restored
      from a backup, or one whose view of the pair broke): answered with
      ``tentative`` keys.  Only the real peer, holding that OFFER's secrets,
      can complete it and prove it with a KEY_CONFIRM, which then promotes
      the keys even below our current epoch; a replayed or forged one is
      never promoted.  (Answering with a fresh offer of ours above our epoch
      instead could be beyond the peer's jump limit when the server has
      pushed our epoch far ahead of the peer's, and wedge the pair for good.)
    - an OFFER for epoch 0, or more than :data:`MAX_EPOCH_JUMP` epochs
      ahead, or one whose keys are unusable (low-order point, malformed
      ML-KEM key): ``bad offer``.
    """
    raw = offer.to_bytes()
    if state.answered_digest is not None and hmac.compare_digest(
        state.answered_digest, sha256(raw)
    ):
        return KexStep(state, "answer resent", send=state.answered_blob)
    if offer.epoch < 1 or offer.epoch > current_epoch + 1 + MAX_EPOCH_JUMP:
        return KexStep(state, "bad offer")
    if offer.epoch <= current_epoch:
        return _answer(state, identity, peer_id, offer, raw, entropy, "answered", current_epoch)
    pending = state.pending
    if pending is None or pending.epoch < offer.epoch:
        outcome = "answered" if pending is None else "crossing lost"
        return _answer(state, identity, peer_id, offer, raw, entropy, outcome, current_epoch)
    if pending.epoch == offer.epoch:
        if peer_id < identity.user_id:
            return _answer(
                state, identity, peer_id, offer, raw, entropy, "crossing lost", current_epoch
            )
        return KexStep(state, "crossing won")
    # Our outstanding offer is for a later epoch than theirs: ours stands.
    return KexStep(state, "crossing won")


def on_accept(
    state: KexState, identity: Identity, peer_id: int, accept: Accept, current_epoch: int = 0
) -> KexStep:
    """Handle an ACCEPT whose IK the caller has already matched to the contact.

    An ACCEPT for no outstanding offer is ``stale``; so is one for an offer
    below ``current_epoch`` (the offer is dropped: the pair is past it).  A failed confirmation
    is ``confirm failed`` and drops only that ACCEPT: the offer stays pending
    (anyone can write an ACCEPT, and a forged one must not cancel a real
    exchange), so the peer's genuine ACCEPT still completes it.
    """
    pending = state.pending
    if pending is None or accept.epoch != pending.epoch:
        return KexStep(state, "stale")
    if pending.epoch < current_epoch:
        return KexStep(evolve(state, pending=None), "stale")
    try:
        keys = complete_offer(identity, peer_id, pending, accept)
    except KexError:
        return KexStep(state, "confirm failed")
    return KexStep(evolve(state, pending=None), "completed", new_epoch=pending.epoch, new_keys=keys)


def tick(
    state: KexState,
    now: float,
    timeout: float = KEX_TIMEOUT,
    max_offers: int = KEX_MAX_OFFERS,
) -> KexStep:
    """Send an unanswered OFFER again after ``timeout``; after ``max_offers`` copies
    report it once as ``stuck`` (it stays pending: a late ACCEPT still completes)."""
    pending = state.pending
    if pending is None or now - pending.last_sent < timeout:
        return KexStep(state, "idle")
    if pending.offers_sent < max_offers:
        pending = evolve(pending, last_sent=now, offers_sent=pending.offers_sent + 1)
        return KexStep(evolve(state, pending=pending), "retry", send=pending.blob)
    if not pending.reported:
        return KexStep(evolve(state, pending=evolve(pending, reported=True)), "stuck")
    return KexStep(state, "idle")
