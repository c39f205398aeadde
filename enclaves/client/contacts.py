"""Per-contact state values, trust levels and in-person key import (DESIGN.md §5).

A :class:`Contact` is an immutable value; every change returns a new one.
Petnames are local only and never leave this machine.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac

from attrs import evolve, field, frozen

from enclaves.client.e2e import ReplayWindow
from enclaves.client.kex import MAX_EPOCH_JUMP, Identity, KexState
from enclaves.crypto import KeyPair, fingerprint, format_digits, safety_number

__all__ = [
    "GRACE",
    "MAX_CONTACTS",
    "MAX_HELD",
    "MAX_HELD_BYTES",
    "MAX_TENTATIVE",
    "IK_PREFIX",
    "Trust",
    "EpochKeys",
    "HeldBlob",
    "Contact",
    "ContactError",
    "IKFormatError",
    "IKMismatch",
    "encode_ik",
    "parse_ik",
    "import_in_person",
    "own_fingerprint",
]

GRACE = 24 * 3600.0  # seconds the previous epoch's keys still open messages
MAX_CONTACTS = 100_000  # contacts (removed ones included) a keystore holds at most
MAX_HELD = 256  # blobs kept per contact while waiting for keys or a key decision
MAX_HELD_BYTES = 4 * 1024 * 1024  # bytes of held blobs over all contacts (a server can
# send blobs under any sender id: this bounds what it can make the keystore carry)
MAX_TENTATIVE = 4  # unconfirmed answered exchanges kept per contact (oldest dropped)
IK_PREFIX = "enclaves-ik:"


class Trust(enum.Enum):
    """How this contact's identity key is known to be theirs."""

    UNVERIFIED = "unverified"  # keyed through the server only
    VERIFIED = "verified"  # safety number compared with the person
    IN_PERSON = "in person"  # identity key imported out of band

    def __str__(self) -> str:
        return self.value


class ContactError(ValueError):
    """A user-facing contact error; the text is safe to show."""


class IKFormatError(ContactError):
    pass


class IKMismatch(ContactError):
    pass


@frozen
class EpochKeys:
    """The pair keys of one epoch, when this side adopted them (``now`` seconds),
    and the replay window of the peer's counters under them."""

    epoch: int
    keys: KeyPair = field(repr=False)
    adopted: float
    window: ReplayWindow = field(factory=ReplayWindow)


@frozen
class HeldBlob:
    """An e2e blob from this contact kept until keys exist or a new IK is accepted."""

    msg_id: bytes
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")


def _short(value: bytes | None) -> str:
    return "None" if value is None else value[:4].hex() + "…"


@frozen
class Contact:
    """Everything this client knows about one other user.

    A ``removed`` contact is a tombstone: the server said REMOVED, the pair
    keys are gone, the identity key and trust are kept, and nothing from or
    to this id is processed again (a revoked user comes back under a new id).

    An ``unlisted`` contact was missing from the server's last user list
    (revoked while we were offline, or its account file unreadable on the
    server): nothing is sent to it, nothing is deleted, and it is ordinary
    again once the server lists it.
    """

    user_id: int
    petname: str | None = None
    ik: bytes | None = field(default=None, repr=_short)
    trust: Trust = Trust.UNVERIFIED
    pending_ik: bytes | None = field(default=None, repr=_short)
    current: EpochKeys | None = None
    previous: EpochKeys | None = None
    send_counter: int = 0
    kex: KexState = field(factory=KexState)
    send_confirmed: bool = False
    held: tuple[HeldBlob, ...] = ()
    removed: bool = False  # tombstone after REMOVED: ``ik`` and trust stay pinned
    # Keys of OFFERs we answered while ``current`` existed, oldest first: they
    # open messages but are never used to send until one of them is promoted
    # by a MESSAGE from the peer that authenticates under it.
    tentative: tuple[EpochKeys, ...] = ()
    unlisted: bool = False

    @property
    def epoch(self) -> int:
        """The number of completed KEXes (0: no pair keys yet)."""
        return 0 if self.current is None else self.current.epoch

    @property
    def offer_floor(self) -> int:
        """The epoch our next OFFER must go above: the current one, or the
        highest tentative epoch (an OFFER we answered) unless that is so far
        ahead that the peer would refuse our offer (a forged epoch)."""
        limit = self.epoch + MAX_EPOCH_JUMP // 2
        return max([self.epoch, *(t.epoch for t in self.tentative if t.epoch <= limit)])

    @property
    def name(self) -> str:
        """The petname, else the decimal id."""
        return self.petname if self.petname else str(self.user_id)

    def with_keys(self, epoch: int, keys: KeyPair, now: float) -> Contact:
        """Adopt new pair keys; the current ones become the grace-period previous.

        Tentative keys of this epoch or older are dropped: they can no longer
        become current."""
        return evolve(
            self,
            current=EpochKeys(epoch, keys, now),
            previous=self.current,
            tentative=tuple(t for t in self.tentative if t.epoch > epoch),
        )

    def with_tentative(self, epoch: int, keys: KeyPair, now: float) -> Contact:
        """Keep the keys of an answered OFFER for receiving only (at most
        :data:`MAX_TENTATIVE`, the oldest dropped first)."""
        return evolve(
            self, tentative=(*self.tentative, EpochKeys(epoch, keys, now))[-MAX_TENTATIVE:]
        )

    def tentative_for(self, epoch: int) -> tuple[EpochKeys, ...]:
        """The tentative keys that might open a MESSAGE of ``epoch``, newest first."""
        return tuple(t for t in reversed(self.tentative) if t.epoch == epoch)

    def promote(self, keys: EpochKeys, window: ReplayWindow, now: float) -> Contact:
        """A MESSAGE authenticated under tentative ``keys``: they become current
        (adopted ``now``, with ``window``); the old current becomes previous."""
        return self.with_keys(keys.epoch, keys.keys, now).with_window(keys.epoch, window)

    def keys_for(self, epoch: int, now: float, grace: float = GRACE) -> EpochKeys | None:
        """The keys (and window) that open a MESSAGE of ``epoch`` at ``now``, if kept."""
        if self.current is not None and self.current.epoch == epoch:
            return self.current
        prev = self.previous
        if (
            prev is not None
            and prev.epoch == epoch
            and self.current is not None
            and now < self.current.adopted + grace
        ):
            return prev
        return None

    def with_window(self, epoch: int, window: ReplayWindow) -> Contact:
        """Record the replay window of ``epoch`` (current or previous)."""
        if self.current is not None and self.current.epoch == epoch:
            return evolve(self, current=evolve(self.current, window=window))
        if self.previous is not None and self.previous.epoch == epoch:
            return evolve(self, previous=evolve(self.previous, window=window))
        return self

    def expire(self, now: float, grace: float = GRACE) -> Contact:
        """Delete the previous epoch's keys once the grace period is over."""
        if (
            self.previous is not None
            and self.current is not None
            and now >= self.current.adopted + grace
        ):
            return evolve(self, previous=None)
        return self

    def safety_number(self, own: Identity) -> str:
        """The pair's 60 digits in groups of five (needs a known IK)."""
        if self.ik is None:
            raise ContactError(f"no identity key known for {self.name} yet")
        return format_digits(safety_number(own.public, own.user_id, self.ik, self.user_id))

    def pending_safety_number(self, own: Identity) -> str:
        """The safety number the pending (changed) identity key would give."""
        if self.pending_ik is None:
            raise ContactError(f"no identity key change pending for {self.name}")
        return format_digits(safety_number(own.public, own.user_id, self.pending_ik, self.user_id))


def own_fingerprint(own: Identity) -> str:
    """This user's 30 digits, in groups of five."""
    return format_digits(fingerprint(own.public, own.user_id))


def encode_ik(ik: bytes) -> str:
    """``enclaves-ik:`` + base64url (no padding) of the 32-byte identity key."""
    return IK_PREFIX + base64.urlsafe_b64encode(ik).rstrip(b"=").decode("ascii")


def parse_ik(text: str) -> bytes:
    """The 32 bytes of an ``enclaves-ik:`` text, or :class:`IKFormatError`."""
    text = text.strip()
    if not text.startswith(IK_PREFIX):
        raise IKFormatError(f"an identity key starts with {IK_PREFIX!r}")
    body = text[len(IK_PREFIX) :]
    if len(body) != 43:
        raise IKFormatError("an identity key is 43 base64url characters")
    try:
        raw = base64.urlsafe_b64decode(body + "=")
    except (binascii.Error, ValueError):
        raise IKFormatError("an identity key is 43 base64url characters") from None
    if len(raw) != 32 or encode_ik(raw) != text:
        raise IKFormatError("an identity key is 43 base64url characters")
    return raw


def import_in_person(contact: Contact, text: str) -> Contact:
    """Trust ``in person`` if the imported key matches; else :class:`IKMismatch`.

    The imported key is compared with the key the server relayed (or, while a
    change is pending, with the new key: a match accepts the change; a match
    with the key held before rejects it, since the contact still has that
    one).  With no key known yet it is pinned: a KEX under any other key
    raises an identity key change.
    """
    ik = parse_ik(text)
    if contact.pending_ik is not None and hmac.compare_digest(ik, contact.pending_ik):
        return evolve(contact, ik=ik, pending_ik=None, trust=Trust.IN_PERSON, send_confirmed=True)
    if contact.ik is None:
        return evolve(contact, ik=ik, trust=Trust.IN_PERSON)
    if not hmac.compare_digest(ik, contact.ik):
        raise IKMismatch(
            f"the key you imported is NOT the key the server gave for {contact.name}; "
            "trust not changed — check the key with them again"
        )
    return evolve(contact, pending_ik=None, trust=Trust.IN_PERSON)
