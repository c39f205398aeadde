"""The client's sans-IO security core: the one object the UI and the connection glue call.

:class:`ClientCore` owns the keystore state (contacts, outbox, de-dup set,
history) and turns inputs into events.  It never touches the network, the
clock or the disk: the caller passes ``now`` (seconds since the epoch), sends
every :class:`SendBlob` as an inner SEND, and saves :meth:`ClientCore.state`
to the keystore *before* acknowledging a DELIVER with RECEIVED.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Iterable, Mapping

from attrs import evolve, field, frozen
from twisted.logger import Logger

from enclaves.client import kex
from enclaves.client.blob import Accept, BlobError, BlobKind, MessageBlob, Offer, parse_blob
from enclaves.client.contacts import (
    GRACE,
    MAX_CONTACTS,
    MAX_HELD,
    MAX_HELD_BYTES,
    MAX_TENTATIVE,
    Contact,
    ContactError,
    EpochKeys,
    HeldBlob,
    Trust,
    encode_ik,
    import_in_person,
    own_fingerprint,
)
from enclaves.client.e2e import ContentType, Plaintext, ReplayError, open_message, seal_message
from enclaves.client.kex import Entropy, Identity, KexStep
from enclaves.client.state import ClientState, HistoryEntry, OutboxEntry
from enclaves.crypto import CryptoError, KeyPair, Sealer

__all__ = [
    "MSG_ID_SIZE",
    "MAX_SEEN",
    "MAX_HISTORY",
    "MAX_HISTORY_TEXT",
    "MAX_TEXT",
    "MAX_ANSWERS",
    "HEAL_INTERVAL",
    "SendBlob",
    "MessageReceived",
    "KexCompleted",
    "KexRetried",
    "KexStuck",
    "KexFailed",
    "IdentityKeyChanged",
    "BlobHeld",
    "BlobDropped",
    "BlobFromRemoved",
    "Event",
    "Refused",
    "Checkpoint",
    "ClientCore",
]

MSG_ID_SIZE = 16
MAX_SEEN = 4096  # recently seen msg_ids kept for de-duplication
MAX_HISTORY = 1000  # history lines kept per contact
MAX_TEXT = 32 * 1024  # bytes of UTF-8 per message (a longer one received is cut)
# Characters of text kept in one contact's history: the oldest lines go first.
# With MAX_HISTORY alone a peer (or a server in the middle of an unverified
# pair) could make each contact's history 1000 frames' worth, rewritten on
# every save.
MAX_HISTORY_TEXT = 1 << 20
HEAL_INTERVAL = kex.KEX_TIMEOUT  # at most one self-healing OFFER per contact this often
# ACCEPTs to one contact kept in the outbox at most: the server writes the OFFERs
# they answer, so this bounds what it can make the keystore carry.  Only the
# current keys' answer and the MAX_TENTATIVE answered ones can still count.
MAX_ANSWERS = MAX_TENTATIVE + 1

log = Logger()


# -- events ---------------------------------------------------------------------


def _blob_repr(value: bytes) -> str:
    return f"<{len(value)} bytes>"


@frozen
class SendBlob:
    """Send ``blob`` to ``recipient`` as SEND(msg_id); it is already in the outbox."""

    msg_id: bytes
    recipient: int
    blob: bytes = field(repr=_blob_repr)
    kind: str = "message"


@frozen
class MessageReceived:
    """A message that opened, passed the replay check and is now in history.

    ``cut`` is how many bytes of text beyond :data:`MAX_TEXT` were dropped
    (0 for a message of the allowed size: the reference client never sends
    more).
    """

    sender: int
    msg_id: bytes
    text: str = field(repr=False)
    unix_ms: int
    trust: Trust
    epoch: int
    cut: int = 0


@frozen
class KexCompleted:
    """Pair keys for ``epoch`` are in place; ``first`` when the pair had none before.

    The initiator reports it when the ACCEPT's confirm checks; a responder
    that already had keys reports it when the initiator's first MESSAGE under
    the new epoch (its KEY_CONFIRM) authenticates, which promotes them."""

    peer: int
    epoch: int
    first: bool


@frozen
class KexRetried:
    """An unanswered OFFER was sent again (``offers_sent`` copies so far)."""

    peer: int
    epoch: int
    offers_sent: int


@frozen
class KexStuck:
    """An OFFER stayed unanswered after every retry (reported once; it stays pending)."""

    peer: int
    epoch: int


@frozen
class KexFailed:
    """An exchange step failed (``reason`` is plain text).  A failed confirmation
    drops only that ACCEPT: the exchange itself stays outstanding."""

    peer: int
    epoch: int
    reason: str


@frozen
class IdentityKeyChanged:
    """``peer`` now presents another identity key; sending is blocked until
    :meth:`ClientCore.accept_new_ik`.  ``safety_number`` is the new one."""

    peer: int
    safety_number: str


@frozen
class BlobHeld:
    """Kept for later: no keys for its epoch yet, or an identity key decision pending."""

    sender: int
    msg_id: bytes
    reason: str


@frozen
class BlobDropped:
    """Dropped for good (duplicate, replay, failed authentication, malformed...)."""

    sender: int
    msg_id: bytes
    reason: str


@frozen
class BlobFromRemoved:
    """A blob under the id of a user the server said was REMOVED: refused.

    A revoked user always comes back under a new random id, so a removed id
    reappearing is never legitimate — the server (or whoever controls it) is
    trying to replace that contact.  Show it to the user as a warning.
    """

    sender: int
    msg_id: bytes


Event = (
    SendBlob
    | MessageReceived
    | KexCompleted
    | KexRetried
    | KexStuck
    | KexFailed
    | IdentityKeyChanged
    | BlobHeld
    | BlobDropped
    | BlobFromRemoved
)


@frozen
class Checkpoint:
    """What :meth:`ClientCore.rollback` puts back: the state, and the times of
    the last self-healing offers (kept in memory only)."""

    state: ClientState
    last_heal: Mapping[int, float] = field(repr=False)


@frozen
class Refused:
    """:meth:`ClientCore.encrypt_message` did not send.

    ``reason`` is ``confirm unverified`` (ask the user, then call again with
    ``confirmed=True``), ``identity key changed`` (show the new safety number,
    :meth:`ClientCore.accept_new_ik`), ``no keys`` (key exchange not complete),
    ``unknown contact``, ``removed`` (the server removed that user), ``unlisted``
    (missing from the server's user list), ``too long``.
    ``text`` is plain words for the user.
    """

    peer: int
    reason: str
    text: str


# -- the core -------------------------------------------------------------------


class ClientCore:
    """Contacts, KEX, e2e messages, outbox and history for one user; sans-IO."""

    def __init__(
        self,
        state: ClientState,
        entropy: Entropy | None = None,
        grace: float = GRACE,
        kex_timeout: float = kex.KEX_TIMEOUT,
        kex_max_offers: int = kex.KEX_MAX_OFFERS,
        max_contacts: int = MAX_CONTACTS,
    ) -> None:
        self._entropy = entropy if entropy is not None else Entropy()
        self._max_contacts = max_contacts
        self._grace = grace
        self._kex_timeout = kex_timeout
        self._kex_max_offers = kex_max_offers
        self._load(state)
        self._last_heal: dict[int, float] = {}  # in memory: a restart may heal once more

    def _load(self, state: ClientState) -> None:
        """Take ``state`` as the core's own (at start, and by :meth:`rollback`)."""
        self.user_id = state.user_id
        self.server_keys = state.server_keys
        self.endpoint = state.endpoint
        self.identity = Identity.from_private_bytes(state.user_id, state.identity_private)
        self._contacts: dict[int, Contact] = dict(state.contacts)
        self._held_bytes = sum(_held_size(c) for c in self._contacts.values())
        self._outbox: dict[bytes, OutboxEntry] = {e.msg_id: e for e in state.outbox}
        self._seen: deque[bytes] = deque(state.seen[-MAX_SEEN:])
        self._seen_set = set(self._seen)
        self._history_text: dict[int, int] = {}  # characters in each history, once counted
        self._history: dict[int, list[HistoryEntry]] = {
            k: list(v) for k, v in state.history.items()
        }
        self._sealers: dict[tuple[int, int], tuple[KeyPair, Sealer]] = {}

    def __repr__(self) -> str:
        return f"<ClientCore user {self.user_id}>"

    @classmethod
    def new(
        cls,
        user_id: int,
        server_keys: KeyPair,
        endpoint: str | None = None,
        entropy: Entropy | None = None,
        **options: float,
    ) -> ClientCore:
        """A fresh user: a new identity key, no contacts."""
        entropy = entropy if entropy is not None else Entropy()
        identity = entropy.x25519().private_bytes_raw()
        state = ClientState(user_id, server_keys, identity, endpoint)
        return cls(state, entropy, **options)  # type: ignore[arg-type]

    def state(self) -> ClientState:
        """A snapshot for the keystore; save it before acknowledging a DELIVER."""
        return ClientState(
            user_id=self.user_id,
            server_keys=self.server_keys,
            identity_private=self.identity.private_bytes(),
            endpoint=self.endpoint,
            contacts=dict(self._contacts),
            outbox=tuple(self._outbox.values()),
            seen=tuple(self._seen),
            history={k: tuple(v) for k, v in self._history.items() if v},
        )

    def checkpoint(self) -> Checkpoint:
        """The core as it is now, for :meth:`rollback`."""
        return Checkpoint(self.state(), dict(self._last_heal))

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Put the core back as it was at ``checkpoint``: undoes a change that
        the keystore could not be saved with."""
        self._load(checkpoint.state)
        self._last_heal = dict(checkpoint.last_heal)

    def set_server_keys(self, keys: KeyPair) -> None:
        """After ROTATED: the new user-server key pair."""
        self.server_keys = keys

    # -- contacts -------------------------------------------------------------

    def contacts(self, include_removed: bool = False) -> list[Contact]:
        """Every contact, by id (removed ones only with ``include_removed``)."""
        return [
            self._contacts[k]
            for k in sorted(self._contacts)
            if include_removed or not self._contacts[k].removed
        ]

    def contact(self, user_id: int) -> Contact:
        try:
            return self._contacts[user_id]
        except KeyError:
            raise ContactError(f"no contact {user_id}") from None

    def find(self, who: str) -> Contact:
        """A contact by petname or decimal id (what the user types)."""
        for c in self._contacts.values():
            if c.petname == who:
                return c
        if who.isdigit() and int(who) in self._contacts:
            return self._contacts[int(who)]
        raise ContactError(f"no contact called {who!r}")

    def add_contact(self, user_id: int) -> Contact:
        """Know ``user_id`` (from DIRECTORY or JOINED); no-op if known (even removed)."""
        if user_id == self.user_id or not 0 < user_id < 1 << 64:
            raise ContactError("not a contact id")
        if user_id not in self._contacts:
            if len(self._contacts) >= self._max_contacts:
                # The server names users: this bounds what it can make us keep.
                raise ContactError(
                    f"user {user_id} not added: this keystore holds at most "
                    f"{self._max_contacts} contacts"
                )
            self._contacts[user_id] = Contact(user_id)
        return self._contacts[user_id]

    def on_directory(self, user_ids: Iterable[int], now: float, start_kex: bool) -> list[Event]:
        """Add every listed user; with ``start_kex`` offer to each without keys
        or a pending offer (the newcomer does this after enrolling)."""
        events: list[Event] = []
        for user_id in user_ids:
            if user_id == self.user_id or user_id == 0:
                continue
            try:
                contact = self.add_contact(user_id)
            except ContactError as error:
                log.warn("directory: {error}; the rest are ignored", error=str(error))
                break
            if contact.removed:
                log.info("the directory lists removed user {peer}: ignored", peer=user_id)
                continue
            contact = self.relist(user_id)
            if start_kex and contact.current is None and contact.kex.pending is None:
                events += self.start_kex(user_id, now)
        return events

    def remove_contact(self, user_id: int) -> list[bytes]:
        """After REMOVED: keep a tombstone (identity key, trust, petname), delete
        the pair keys and any exchange; unsent messages to it fail (their ids
        are returned).  Every later blob under this id is refused
        (:class:`BlobFromRemoved`)."""
        contact = self._contacts.get(user_id)
        if contact is not None:
            self._put(
                evolve(
                    contact,
                    removed=True,
                    pending_ik=None,
                    current=None,
                    previous=None,
                    tentative=(),
                    kex=kex.KexState(),
                    held=(),
                )
            )
        self._drop_sealers(user_id)
        return self._fail_outbox(user_id, "user removed")

    def relist(self, user_id: int) -> Contact:
        """The server lists ``user_id`` (DIRECTORY or JOINED): no longer unlisted."""
        contact = self.contact(user_id)
        if contact.unlisted and not contact.removed:
            log.info("user {peer} is on the user list again", peer=user_id)
            contact = self._put(evolve(contact, unlisted=False))
        return contact

    def mark_unlisted(self, user_id: int) -> list[bytes]:
        """The server's user list leaves ``user_id`` out: send nothing to it (its
        unsent messages fail: their ids are returned), delete nothing;
        :meth:`relist` undoes it."""
        contact = self._contacts.get(user_id)
        if contact is None or contact.removed or contact.unlisted:
            return []
        self._put(evolve(contact, unlisted=True))
        return self._fail_outbox(user_id, "not on the server's user list")

    def _fail_outbox(self, user_id: int, reason: str) -> list[bytes]:
        """Unsent messages to ``user_id`` fail (their ids are returned); key
        exchange blobs to it go (a new exchange runs if it is ever reachable
        again)."""
        failed = []
        for msg_id, entry in list(self._outbox.items()):
            if entry.recipient != user_id:
                continue
            if entry.kind != "message":
                del self._outbox[msg_id]
            elif entry.status == "pending":
                self._outbox[msg_id] = evolve(entry, status="failed", reason=reason)
                self._set_status(msg_id, "failed")
                failed.append(msg_id)
        return failed

    def drop_outbox(self, msg_id: bytes) -> None:
        """Forget an outbox entry that can never be useful (a key exchange blob
        to a user the server does not know)."""
        self._outbox.pop(msg_id, None)

    def set_petname(self, user_id: int, petname: str | None) -> Contact:
        """A local name; must not look like an id or clash with another petname."""
        contact = self.contact(user_id)
        if petname is not None:
            petname = petname.strip()
            if not petname or petname.isdigit() or any(ch.isspace() for ch in petname):
                raise ContactError("a name is one word and not a number")
            for other in self._contacts.values():
                if other.petname == petname and other.user_id != user_id:
                    raise ContactError(f"{petname!r} already names {other.user_id}")
        return self._put(evolve(contact, petname=petname))

    # -- trust ----------------------------------------------------------------

    def fingerprint(self) -> str:
        """This user's 30 digits in groups of five."""
        return own_fingerprint(self.identity)

    def own_ik_text(self) -> str:
        """This user's ``enclaves-ik:`` text, to give to a contact in person."""
        return encode_ik(self.identity.public)

    def safety_number(self, user_id: int) -> str:
        """The pair's 60 digits (current key; see :meth:`pending_safety_number`)."""
        return self.contact(user_id).safety_number(self.identity)

    def pending_safety_number(self, user_id: int) -> str:
        return self.contact(user_id).pending_safety_number(self.identity)

    def verify(self, user_id: int) -> Contact:
        """The user compared the safety number: trust ``verified`` (``in person`` stays)."""
        contact = self.contact(user_id)
        if contact.ik is None:
            raise ContactError(f"no identity key known for {contact.name} yet")
        if contact.pending_ik is not None:
            raise ContactError(f"{contact.name}'s identity key changed: accept or reject first")
        if contact.trust is Trust.IN_PERSON:
            return contact
        return self._put(evolve(contact, trust=Trust.VERIFIED, send_confirmed=True))

    def import_ik(self, user_id: int, text: str, now: float) -> list[Event]:
        """In-person import: trust ``in person`` on a match, :class:`ContactError` if not."""
        before = self.contact(user_id)
        after = self._put(import_in_person(before, text))
        rejected = before.pending_ik
        if rejected is None or after.pending_ik is not None:
            return []
        if after.ik != rejected:
            # The key the contact had all along, in person: the change was
            # false (a server's forgery).  Sending works again under the
            # current keys; blobs under the rejected key go.
            log.warn("identity key change of {peer} rejected by an in-person import",
                     peer=user_id)  # fmt: skip
            held = tuple(h for h in after.held if _blob_ik(h.blob) != rejected)
            self._put(evolve(after, held=held))
            return []
        return self._after_ik_accepted(after, now)

    def accept_new_ik(self, user_id: int, now: float) -> list[Event]:
        """The user accepts the changed identity key: trust drops to ``unverified``,
        the old pair keys are deleted, held blobs are processed and a KEX runs."""
        contact = self.contact(user_id)
        if contact.pending_ik is None:
            raise ContactError(f"no identity key change pending for {contact.name}")
        contact = self._put(
            evolve(
                contact,
                ik=contact.pending_ik,
                pending_ik=None,
                trust=Trust.UNVERIFIED,
                send_confirmed=True,
            )
        )
        return self._after_ik_accepted(contact, now)

    def _after_ik_accepted(self, contact: Contact, now: float) -> list[Event]:
        contact = self._put(evolve(contact, current=None, previous=None, tentative=()))
        self._drop_sealers(contact.user_id)
        events = self._replay_held(contact.user_id, now)
        contact = self._contacts[contact.user_id]
        if contact.current is None and contact.kex.pending is None:
            events += self.start_kex(contact.user_id, now)
        return events

    # -- key exchange ---------------------------------------------------------

    def start_kex(self, user_id: int, now: float) -> list[Event]:
        """Offer a (re)key at epoch+1; while an offer is pending this does nothing."""
        contact = self.add_contact(user_id)
        if contact.removed or contact.unlisted:
            return []
        pending = contact.kex.pending
        if pending is not None:
            if not pending.reported:
                return []
            # Stuck (never answered after every retry): the peer may never be
            # able to take it (e.g. beyond its jump limit); start afresh.
            contact = self._put(evolve(contact, kex=evolve(contact.kex, pending=None)))
        step = kex.start(contact.kex, self.identity, contact.offer_floor, self._entropy, now)
        return self._apply(contact, step, now)

    def tick(self, now: float) -> list[Event]:
        """Periodic work: resend unanswered offers, report stuck ones, expire old keys."""
        events: list[Event] = []
        for user_id in sorted(self._contacts):
            contact = self._contacts[user_id]
            expired = contact.expire(now, self._grace)
            if expired is not contact:
                contact = self._put(expired)
                self._drop_sealers(user_id)
            if contact.unlisted:
                continue  # nothing is sent to it; its exchange resumes once listed
            step = kex.tick(contact.kex, now, self._kex_timeout, self._kex_max_offers)
            events += self._apply(contact, step, now)
        return events

    def _apply(
        self, contact: Contact, step: KexStep, now: float, learned_ik: bytes | None = None
    ) -> list[Event]:
        events: list[Event] = []
        pending = contact.kex.pending
        contact = evolve(contact, kex=step.state)
        if learned_ik is not None:
            contact = evolve(contact, ik=learned_ik)
        if step.new_keys is not None and step.new_epoch is not None:
            first = contact.current is None
            if step.tentative and not first:
                # Answered an OFFER while a working pair exists: receive-only
                # until the initiator proves it holds these keys.
                contact = contact.with_tentative(step.new_epoch, step.new_keys, now)
            else:
                contact = contact.with_keys(step.new_epoch, step.new_keys, now)
                events.append(KexCompleted(contact.user_id, step.new_epoch, first))
        self._put(contact)
        self._drop_sealers(contact.user_id)
        if step.send is not None:
            events.append(self._queue(contact.user_id, step.send, "kex", now))
        if step.outcome == "completed":
            # Prove to the responder that we hold the new keys (it promotes them).
            events += self._key_confirm(contact.user_id, now)
        epoch = pending.epoch if pending is not None else contact.offer_floor + 1
        if step.outcome == "retry" and step.state.pending is not None:
            events.append(KexRetried(contact.user_id, epoch, step.state.pending.offers_sent))
        elif step.outcome == "stuck":
            events.append(KexStuck(contact.user_id, epoch))
        elif step.outcome == "confirm failed":
            log.warn("key confirmation failed for {peer}: ACCEPT dropped", peer=contact.user_id)
            events.append(
                KexFailed(
                    contact.user_id,
                    epoch,
                    "an answer failed key confirmation (forged or damaged); ignored, "
                    "still waiting for the real one",
                )
            )
        elif step.outcome == "bad offer":
            log.warn("unusable key exchange offer from {peer}", peer=contact.user_id)
            events.append(KexFailed(contact.user_id, epoch, "unusable offer"))
            # It may be a real offer we cannot take (its epoch beyond our jump
            # limit): offer one of ours, which the peer can always answer.
            events += self._heal(contact.user_id, now)
        elif step.outcome == "epochs exhausted":
            events.append(KexFailed(contact.user_id, epoch, "no more rekeys possible"))
        if step.new_keys is not None:
            events += self._replay_held(contact.user_id, now)
        return events

    # -- incoming -------------------------------------------------------------

    def handle_blob(self, sender: int, msg_id: bytes, blob: bytes, now: float) -> list[Event]:
        """Process one DELIVER.  Afterwards save :meth:`state`, then send RECEIVED."""
        if msg_id in self._seen_set:
            return [BlobDropped(sender, msg_id, "duplicate")]
        self._remember(msg_id)
        if sender == self.user_id or not 0 < sender < 1 << 64:
            return [BlobDropped(sender, msg_id, "bad sender")]
        known = self._contacts.get(sender)
        if known is not None and known.removed:
            log.warn("refused a blob under the id of removed user {sender}", sender=sender)
            return [BlobFromRemoved(sender, msg_id)]
        try:
            parsed = parse_blob(blob)
        except BlobError as e:
            log.info("dropped a malformed e2e blob from {sender}: {why}", sender=sender, why=e)
            return [BlobDropped(sender, msg_id, "malformed")]
        try:
            self.add_contact(sender)
        except ContactError as error:
            log.warn("dropped a blob: {error}", error=str(error))
            return [BlobDropped(sender, msg_id, "too many contacts")]
        return self._process(sender, msg_id, bytes(blob), parsed, now)

    def _process(
        self,
        sender: int,
        msg_id: bytes,
        raw: bytes,
        parsed: MessageBlob | Offer | Accept,
        now: float,
    ) -> list[Event]:
        contact = self._contacts[sender]
        if isinstance(parsed, MessageBlob):
            return self._message(contact, msg_id, raw, parsed, now)
        if hmac.compare_digest(parsed.ik, self.identity.public):
            # Our own OFFER or ACCEPT sent back to us as the contact's (reflection):
            # never pin our own key on a contact, never let it end our exchange.
            log.warn("dropped our own key exchange blob reflected as {peer}'s", peer=sender)
            return [BlobDropped(sender, msg_id, "reflected")]
        events: list[Event] = []
        first_ik = contact.ik is None
        if not first_ik and not hmac.compare_digest(contact.ik or b"", parsed.ik):
            if contact.pending_ik is None or not hmac.compare_digest(contact.pending_ik, parsed.ik):
                contact = self._put(evolve(contact, pending_ik=parsed.ik))
                log.warn("identity key of {peer} changed", peer=sender)
                events.append(
                    IdentityKeyChanged(sender, contact.pending_safety_number(self.identity))
                )
            return events + self._hold(contact, msg_id, raw, "identity key changed")
        if isinstance(parsed, Offer):
            step = kex.on_offer(
                contact.kex,
                self.identity,
                sender,
                parsed,
                contact.epoch,
                self._entropy,
                now,
            )
        else:
            step = kex.on_accept(contact.kex, self.identity, sender, parsed, contact.epoch)
        # First contact: the key is learned only from an exchange that completed.
        learned = parsed.ik if first_ik and step.new_keys is not None else None
        return events + self._apply(contact, step, now, learned)

    def _message(
        self, contact: Contact, msg_id: bytes, raw: bytes, blob: MessageBlob, now: float
    ) -> list[Event]:
        sender = contact.user_id
        events: list[Event] = []
        keys = contact.keys_for(blob.epoch, now, self._grace)
        candidates = contact.tentative_for(blob.epoch)
        if keys is not None and candidates and not self._opens(contact, keys, blob):
            # Current keys from a forged first OFFER, say, and an answered
            # OFFER of the same epoch: the tentative ones may be the real ones.
            keys = None
        if keys is None:
            if not candidates:
                if blob.epoch > contact.epoch:
                    events = self._hold(contact, msg_id, raw, "no keys for its epoch yet")
                elif blob.epoch == 0:
                    events = [BlobDropped(sender, msg_id, "epoch 0 never has keys")]
                else:
                    events = [BlobDropped(sender, msg_id, "epoch keys deleted")]
                if blob.epoch == 0:  # no epoch 0 ever had keys: nothing to heal
                    return events
                return events + self._heal(sender, now)
            opened = self._open_tentative(contact, blob, candidates)
            if opened is None:
                log.info("dropped a message from {sender} that failed authentication",
                         sender=sender)  # fmt: skip
                return [
                    BlobDropped(sender, msg_id, "failed authentication"),
                    *self._heal(sender, now),
                ]
            tentative, plain = opened
            try:
                window = tentative.window.accept(plain.counter)
            except ReplayError:  # a fresh window never refuses a positive counter
                return [BlobDropped(sender, msg_id, "replay")]
            # The peer proved it holds these keys: they become current.
            contact = self._put(contact.promote(tentative, window, now))
            self._drop_sealers(sender)
            log.info(
                "keys of epoch {epoch} with {peer} confirmed", epoch=contact.epoch, peer=sender
            )
            events.append(KexCompleted(sender, contact.epoch, False))
        else:
            try:
                plain = open_message(self._sealer(sender, keys.epoch, keys.keys), blob, sender,
                                     self.user_id)  # fmt: skip
                window = keys.window.accept(plain.counter)
            except CryptoError:
                log.info("dropped a message from {sender} that failed authentication",
                         sender=sender)  # fmt: skip
                return [BlobDropped(sender, msg_id, "failed authentication")]
            except ReplayError:
                return [BlobDropped(sender, msg_id, "replay")]
            contact = self._put(contact.with_window(blob.epoch, window))
        pending = contact.kex.pending
        if pending is not None and blob.epoch == contact.epoch and pending.epoch <= blob.epoch:
            # The peer proved it holds our current keys, so it is past our offer's
            # epoch and will never answer it: drop the offer and its secrets.
            contact = self._put(evolve(contact, kex=evolve(contact.kex, pending=None)))
        if plain.content_type == ContentType.KEY_CONFIRM:
            return events  # its work (promotion) is done; never shown
        if plain.content_type != ContentType.TEXT:
            return [*events, BlobDropped(sender, msg_id, "unknown content type")]
        body = plain.body
        cut = max(len(body) - MAX_TEXT, 0)
        text = body[:MAX_TEXT].decode("utf-8", errors="replace")
        if cut and text.endswith("\ufffd"):
            text = text[:-1]  # a character split by the cut
        self._add_history(
            sender,
            HistoryEntry("in", msg_id, plain.unix_ms, text, contact.trust, "received", blob.epoch),
        )
        return [
            *events,
            MessageReceived(sender, msg_id, text, plain.unix_ms, contact.trust, blob.epoch, cut),
        ]

    def _opens(self, contact: Contact, keys: EpochKeys, blob: MessageBlob) -> bool:
        """Whether ``blob`` authenticates under ``keys`` (nothing is recorded)."""
        try:
            open_message(Sealer(keys.keys), blob, contact.user_id, self.user_id)
        except CryptoError:
            return False
        return True

    def _open_tentative(
        self, contact: Contact, blob: MessageBlob, candidates: tuple[EpochKeys, ...]
    ) -> tuple[EpochKeys, Plaintext] | None:
        """The first tentative key set under which ``blob`` authenticates, and its plaintext."""
        for candidate in candidates:
            try:
                plain = open_message(Sealer(candidate.keys), blob, contact.user_id, self.user_id)
            except CryptoError:
                continue
            return candidate, plain
        return None

    def _heal(self, user_id: int, now: float) -> list[Event]:
        """A MESSAGE under an epoch we hold no keys for, or an OFFER we cannot
        take: the pair is out of step (or someone injected it).  Offer a fresh
        exchange unless one of ours is pending and not yet stuck, at most once
        per :data:`HEAL_INTERVAL`."""
        contact = self._contacts[user_id]
        pending = contact.kex.pending
        if (pending is not None and not pending.reported) or contact.pending_ik is not None:
            return []
        last = self._last_heal.get(user_id)
        if last is not None and now < last + HEAL_INTERVAL:
            return []
        self._last_heal[user_id] = now
        log.info("out of step with {peer}: offering a fresh key exchange", peer=user_id)
        return self.start_kex(user_id, now)

    def _key_confirm(self, user_id: int, now: float) -> list[Event]:
        """A KEY_CONFIRM (empty body) under our current keys with ``user_id``."""
        contact = self._contacts[user_id]
        current = contact.current
        if current is None:  # not after a completed exchange
            return []
        counter = contact.send_counter + 1
        blob = seal_message(
            self._sealer(user_id, current.epoch, current.keys),
            current.epoch,
            self.user_id,
            user_id,
            Plaintext(ContentType.KEY_CONFIRM, counter, int(now * 1000), b""),
        )
        self._put(evolve(contact, send_counter=counter))
        return [self._queue(user_id, blob, "kex", now)]

    def _hold(self, contact: Contact, msg_id: bytes, raw: bytes, reason: str) -> list[Event]:
        if self._held_bytes + len(raw) > MAX_HELD_BYTES:
            # Held blobs are the server's to send; past this it gets no more room.
            log.warn(
                "dropped a blob from {peer}: {size} bytes already held for all contacts",
                peer=contact.user_id,
                size=self._held_bytes,
            )
            return [BlobDropped(contact.user_id, msg_id, "too many held for all contacts")]
        events: list[Event] = []
        held = (*contact.held, HeldBlob(msg_id, raw))
        while len(held) > MAX_HELD:
            events.append(BlobDropped(contact.user_id, held[0].msg_id, "too many held"))
            held = held[1:]
        self._put(evolve(contact, held=held))
        events.append(BlobHeld(contact.user_id, msg_id, reason))
        return events

    def _replay_held(self, user_id: int, now: float) -> list[Event]:
        contact = self._contacts[user_id]
        held = contact.held
        if not held:
            return []
        self._put(evolve(contact, held=()))
        events: list[Event] = []
        for item in held:
            parsed = parse_blob(item.blob)  # parsed once already
            events += [
                e
                for e in self._process(user_id, item.msg_id, item.blob, parsed, now)
                if not (isinstance(e, BlobHeld) and e.msg_id == item.msg_id)
            ]
        return events

    # -- outgoing -------------------------------------------------------------

    def encrypt_message(
        self, user_id: int, text: str, now: float, confirmed: bool = False
    ) -> SendBlob | Refused:
        """Seal ``text`` for ``user_id``, put it in the outbox and history.

        Refuses (:class:`Refused`) while the contact's identity key change is
        pending, before its first KEX completes, and for the first message to
        an ``unverified`` contact unless ``confirmed`` (the user said yes).
        """
        contact = self._contacts.get(user_id)
        if contact is None:
            return Refused(user_id, "unknown contact", f"no contact {user_id}")
        if contact.removed:
            return Refused(user_id, "removed", f"{contact.name} was removed from the server")
        if contact.unlisted:
            return Refused(
                user_id,
                "unlisted",
                f"{contact.name} is not on the server's user list (removed, or the server "
                "cannot read their account); sending is refused until it lists them again",
            )
        if contact.pending_ik is not None:
            return Refused(
                user_id,
                "identity key changed",
                f"{contact.name}'s identity key changed; sending is blocked until you "
                "check the new safety number and accept it",
            )
        current = contact.current
        if current is None:
            return Refused(
                user_id, "no keys", f"the key exchange with {contact.name} is not complete yet"
            )
        if contact.trust is Trust.UNVERIFIED and not contact.send_confirmed:
            if not confirmed:
                return Refused(
                    user_id,
                    "confirm unverified",
                    f"{contact.name} is not verified: the server could be in the middle. "
                    "Send anyway?",
                )
            contact = evolve(contact, send_confirmed=True)
        body = text.encode("utf-8")
        if len(body) > MAX_TEXT:
            return Refused(user_id, "too long", f"a message is at most {MAX_TEXT} bytes")
        counter = contact.send_counter + 1
        unix_ms = int(now * 1000)
        blob = seal_message(
            self._sealer(user_id, current.epoch, current.keys),
            current.epoch,
            self.user_id,
            user_id,
            Plaintext(ContentType.TEXT, counter, unix_ms, body),
        )
        contact = self._put(evolve(contact, send_counter=counter))
        event = self._queue(user_id, blob, "message", now)
        self._add_history(
            user_id,
            HistoryEntry(
                "out", event.msg_id, unix_ms, text, contact.trust, "sending", current.epoch
            ),
        )
        return event

    def _queue(self, recipient: int, blob: bytes, kind: str, now: float) -> SendBlob:
        if kind == "kex" and blob[:1] == bytes([BlobKind.ACCEPT]):
            self._prune_answers(recipient, blob)
        msg_id = self._entropy.random_bytes(MSG_ID_SIZE)
        self._outbox[msg_id] = OutboxEntry(msg_id, recipient, blob, kind, "pending", None, now)
        return SendBlob(msg_id, recipient, blob, kind)

    def _prune_answers(self, recipient: int, blob: bytes) -> None:
        """Make room for one more ACCEPT to ``recipient``: an earlier copy of the
        same answer goes (it is being sent again), and so do the oldest beyond
        :data:`MAX_ANSWERS - 1`, pending or failed.  Anyone who can inject
        OFFERs gets one answer each, so the outbox would otherwise grow for as
        long as the server withholds ACCEPTED (docs/client.rst)."""
        answers = [
            e.msg_id
            for e in self._outbox.values()
            if e.recipient == recipient and e.kind == "kex" and e.blob[:1] == blob[:1]
        ]
        for msg_id in answers:
            if self._outbox[msg_id].blob == blob:
                del self._outbox[msg_id]
                answers.remove(msg_id)
                break
        for msg_id in answers[: max(len(answers) - (MAX_ANSWERS - 1), 0)]:
            del self._outbox[msg_id]
            log.info("dropped an unsent key exchange answer to {peer}", peer=recipient)

    # -- outbox and receipts --------------------------------------------------

    def pending_sends(self) -> list[SendBlob]:
        """Everything to send again after a reconnect, oldest first."""
        return [
            SendBlob(e.msg_id, e.recipient, e.blob, e.kind)
            for e in self._outbox.values()
            if e.status == "pending"
        ]

    def outbox(self) -> list[OutboxEntry]:
        return list(self._outbox.values())

    def on_accepted(self, msg_id: bytes) -> None:
        """ACCEPTED: the server took responsibility; leave the outbox."""
        if self._outbox.pop(msg_id, None) is not None:
            self._set_status(msg_id, "accepted")

    def on_delivered(self, msg_id: bytes) -> int | None:
        """DELIVERED: mark history; returns the recipient the first time only (a
        repeated DELIVERED, or one for an unknown message, returns None)."""
        self._outbox.pop(msg_id, None)
        if self._status_of(msg_id) == "delivered":
            return None
        return self._set_status(msg_id, "delivered")

    def status_of(self, msg_id: bytes) -> str | None:
        """The history status of the newest outgoing line with ``msg_id``."""
        return self._status_of(msg_id)

    def _status_of(self, msg_id: bytes) -> str | None:
        """The history status of the newest outgoing line with ``msg_id``."""
        for lines in self._history.values():
            for line in reversed(lines):
                if line.msg_id == msg_id and line.direction == "out":
                    return line.status
        return None

    def on_refused(self, msg_id: bytes, reason: str) -> None:
        """The server refused a SEND: kept as ``failed`` with ``reason``, never dropped."""
        entry = self._outbox.get(msg_id)
        if entry is not None:
            self._outbox[msg_id] = evolve(entry, status="failed", reason=reason)
            self._set_status(msg_id, "failed")

    def on_lost(self, msg_id: bytes) -> int | None:
        """An ERROR for a message the server had accepted (its recipient was
        revoked before reading it): the history line becomes ``failed``.
        Returns the recipient the first time only (None for a repeat, or an
        unknown or delivered message)."""
        if self._status_of(msg_id) != "accepted":
            return None
        return self._set_status(msg_id, "failed")

    def retry(self, msg_id: bytes) -> SendBlob:
        """Send a failed message again (same blob and msg_id)."""
        entry = self._outbox.get(msg_id)
        if entry is None:
            raise ContactError("no such message in the outbox")
        contact = self._contacts.get(entry.recipient)
        if contact is not None and contact.removed:
            raise ContactError(f"{contact.name} was removed from the server")
        if contact is not None and contact.unlisted:
            raise ContactError(
                f"{contact.name} is not on the server's user list; /retry once it lists them again"
            )
        entry = evolve(entry, status="pending", reason=None)
        self._outbox[msg_id] = entry
        self._set_status(msg_id, "sending")
        return SendBlob(entry.msg_id, entry.recipient, entry.blob, entry.kind)

    def history(self, user_id: int) -> list[HistoryEntry]:
        return list(self._history.get(user_id, ()))

    # -- helpers --------------------------------------------------------------

    def _put(self, contact: Contact) -> Contact:
        old = self._contacts.get(contact.user_id)
        if old is None or old.held is not contact.held:
            self._held_bytes += _held_size(contact) - (0 if old is None else _held_size(old))
        self._contacts[contact.user_id] = contact
        return contact

    def _sealer(self, user_id: int, epoch: int, keys: KeyPair) -> Sealer:
        cached = self._sealers.get((user_id, epoch))
        if cached is None or cached[0] != keys:
            cached = self._sealers[(user_id, epoch)] = (keys, Sealer(keys))
        return cached[1]

    def _drop_sealers(self, user_id: int) -> None:
        contact = self._contacts.get(user_id)
        keep = set()
        if contact is not None:
            keep = {k.epoch for k in (contact.current, contact.previous) if k is not None}
        for key in [k for k in self._sealers if k[0] == user_id and k[1] not in keep]:
            del self._sealers[key]

    def _remember(self, msg_id: bytes) -> None:
        self._seen.append(msg_id)
        self._seen_set.add(msg_id)
        while len(self._seen) > MAX_SEEN:
            self._seen_set.discard(self._seen.popleft())

    def _add_history(self, user_id: int, entry: HistoryEntry) -> None:
        """Append a line; the oldest go beyond MAX_HISTORY lines or MAX_HISTORY_TEXT."""
        lines = self._history.setdefault(user_id, [])
        lines.append(entry)
        size = self._history_text.get(user_id)
        size = sum(len(h.text) for h in lines) if size is None else size + len(entry.text)
        drop = max(len(lines) - MAX_HISTORY, 0)
        size -= sum(len(h.text) for h in lines[:drop])
        while size > MAX_HISTORY_TEXT and drop < len(lines) - 1:  # the newest line stays
            size -= len(lines[drop].text)
            drop += 1
        del lines[:drop]
        self._history_text[user_id] = size

    def _set_status(self, msg_id: bytes, status: str) -> int | None:
        """Set the status of our newest line sent as ``msg_id``; its contact, or None."""
        for user_id, lines in self._history.items():
            for i in range(len(lines) - 1, -1, -1):
                if lines[i].msg_id == msg_id and lines[i].direction == "out":
                    if lines[i].status != "delivered":
                        lines[i] = evolve(lines[i], status=status)
                    return user_id
        return None


def _blob_ik(blob: bytes) -> bytes | None:
    """The identity key an OFFER or ACCEPT carries; None for a MESSAGE."""
    try:
        parsed = parse_blob(blob)
    except BlobError:
        return None
    return None if isinstance(parsed, MessageBlob) else parsed.ik


def _held_size(contact: Contact) -> int:
    return sum(len(item.blob) for item in contact.held)
