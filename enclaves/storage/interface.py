"""The storage interface: every method returns a Deferred; see docs/storage.rst."""

from __future__ import annotations

from collections.abc import Collection

from attrs import field, frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from enclaves.crypto import KeyPair

__all__ = [
    "MAX_NOTICES",
    "NOTICE_LIFETIME",
    "IStorage",
    "InventoryEntry",
    "PendingSummary",
    "QuotaExceeded",
    "StorageError",
    "StorageFailed",
    "StoredMessage",
    "UnknownUser",
    "UserExists",
    "UserRecord",
]


#: Most notices kept per user; beyond it the oldest is dropped (and logged).
MAX_NOTICES = 10_000
#: Seconds a notice is kept; older ones are dropped unread.
NOTICE_LIFETIME = 30 * 24 * 3600


class StorageError(Exception):
    """Base of every storage failure; the message is safe to show a user or admin."""


class StorageFailed(StorageError):
    """The disk refused (full, read-only, permission): nothing was stored."""


class QuotaExceeded(StorageError):
    """The recipient's pending-message quota (count or bytes) is full."""


class UnknownUser(StorageError):
    """No user with this id."""


class UserExists(StorageError):
    """A user with this id already exists."""


class KeysReplaced(StorageError):
    """The user's keys are no longer the ones a rotation was to replace."""


@frozen
class UserRecord:
    """A user's current user-server key pair and, while enrolling, its token expiry."""

    user_id: int
    keys: KeyPair = field(repr=False)
    #: Unix milliseconds after which the enrollment token is dead; ``None``
    #: once the user has rotated (enrolled).
    enrollment_expires_ms: int | None = None

    @property
    def enrolling(self) -> bool:
        return self.enrollment_expires_ms is not None


@frozen
class StoredMessage:
    """A pending message as stored for an offline recipient."""

    file_id: int
    recipient: int
    sender: int
    msg_id: bytes
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")


@frozen
class PendingSummary:
    """How many pending messages, and how many bytes of e2e blobs, a recipient has."""

    count: int
    size: int


@frozen
class InventoryEntry:
    """One file the server holds, for the admin's ``inventory()``."""

    name: str
    size: int
    description: str


class IStorage(Interface):
    """Users and pending messages, encrypted at rest.

    Every method returns a ``Deferred``; failures are :class:`StorageError`
    subclasses.  A storage service is also an ``IService``: it is usable
    between ``startService`` and ``stopService``.
    """

    max_pending_count = Attribute("Per-recipient limit on pending messages.")
    max_pending_bytes = Attribute("Per-recipient limit on pending e2e blob bytes.")
    max_notices = Attribute("Per-user limit on kept notices (the oldest is dropped).")
    notice_lifetime = Attribute("Seconds a notice is kept before it is dropped unread.")

    def add_user(user_id: int, keys: KeyPair, enrollment_expires_ms: int | None) -> Deferred[None]:
        """Store a new user durably.  Fires with None; UserExists if taken."""

    def load_user(user_id: int) -> Deferred[UserRecord | None]:
        """Fires with the :class:`UserRecord`, or None for an unknown id."""

    def replace_user_keys(
        user_id: int, keys: KeyPair, replacing: Collection[KeyPair] | None = None
    ) -> Deferred[None]:
        """Rotate: store ``keys`` durably and end enrollment.  Fires with None.
        With ``replacing``: only if the user's keys are one of those when the
        write starts (rotations are stored one at a time, in order);
        KeysReplaced if not, and nothing is stored."""

    def remove_user(user_id: int) -> Deferred[list[tuple[int, bytes]]]:
        """Delete the user, its pending messages and its notices.  Fires with
        ``(sender, msg_id)`` of each message deleted (a message file too damaged
        to read is deleted unlisted); UnknownUser if there is no such user and
        no pending message for that id (messages left by a quarantined user
        file are deleted too)."""

    def list_users() -> Deferred[list[int]]:
        """Fires with a sorted list of every user id."""

    def enrollments() -> Deferred[dict[int, int]]:
        """Fires with user id -> token expiry (Unix ms) of every user still enrolling."""

    def store_message(recipient: int, sender: int, msg_id: bytes, blob: bytes) -> Deferred[int]:
        """Store a pending message durably (fsynced before the Deferred fires).
        Fires with its file id; QuotaExceeded, UnknownUser or StorageFailed
        otherwise, and then nothing is stored.

        A message from ``sender`` with this ``msg_id`` already stored for
        ``recipient`` (a resend) is not stored again and is not counted against
        the quota: the Deferred fires with that copy's file id — for a copy
        still being stored, once it is durable, or it fails as that store
        fails.  Once the copy is removed, the same message is stored anew."""

    def held_message(recipient: int, sender: int, msg_id: bytes) -> Deferred[int | None]:
        """Fires with the file id of the copy of ``sender``'s ``msg_id`` held
        for ``recipient`` (stored; or being stored, once durable), or None.
        Reads only the index in memory; writes nothing."""

    def pending_for(recipient: int) -> Deferred[list[StoredMessage]]:
        """Fires with the recipient's :class:`StoredMessage` list in arrival order.

        A message is listed from the moment its ``store_message`` fires until
        its ``remove_message`` fires (a store or a removal still in flight does
        not change the list yet): the router relies on this."""

    def remove_message(file_id: int) -> Deferred[None]:
        """Delete one pending message durably.  Fires with None (also if absent)."""

    def pending_summary() -> Deferred[dict[int, PendingSummary]]:
        """Fires with a dict: recipient id -> :class:`PendingSummary`."""

    def inventory() -> Deferred[list[InventoryEntry]]:
        """Fires with a list of :class:`InventoryEntry`, one per file held."""

    def store_notice(user_id: int, data: bytes) -> Deferred[int]:
        """Keep ``data`` (1 to MAX_NOTICE_DATA bytes: an encoded inner message
        for ``user_id``'s next login) durably.  Fires with its notice id, which
        orders the user's notices; beyond ``max_notices`` the oldest is dropped.
        UnknownUser or StorageFailed otherwise."""

    def notices_for(user_id: int) -> Deferred[list[tuple[int, bytes]]]:
        """Fires with the user's (notice id, data) pairs, oldest first.  Notices
        older than ``notice_lifetime`` are dropped first; a damaged one is
        quarantined, logged and left out."""

    def remove_notices(user_id: int, ids: list[int]) -> Deferred[None]:
        """Delete these notices of ``user_id`` durably (absent ids are ignored)."""
