"""An in-memory :class:`IStorage`: every Deferred has already fired.

A legitimate second backend with the file store's semantics (quota, arrival
order, errors) but no durability: for tests that want determinism, and for
trying the server out.  Nothing survives a restart.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Collection
from typing import Any

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from enclaves.crypto import KeyPair
from enclaves.storage.formats import MAX_NOTICE_DATA
from enclaves.storage.interface import (
    MAX_NOTICES,
    NOTICE_LIFETIME,
    InventoryEntry,
    IStorage,
    KeysReplaced,
    PendingSummary,
    QuotaExceeded,
    StorageFailed,
    StoredMessage,
    UnknownUser,
    UserExists,
    UserRecord,
)

__all__ = ["MemoryStorage"]

DEFAULT_MAX_PENDING_COUNT = 10_000
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


@implementer(IStorage)
class MemoryStorage(Service):
    """Users and pending messages in dicts; ``fail_writes`` simulates a full disk."""

    def __init__(
        self,
        *,
        max_pending_count: int = DEFAULT_MAX_PENDING_COUNT,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_notices: int = MAX_NOTICES,
        notice_lifetime: float = NOTICE_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_pending_count = max_pending_count
        self.max_pending_bytes = max_pending_bytes
        self.max_notices = max_notices
        self.notice_lifetime = notice_lifetime
        self._clock = clock
        #: user id -> [(notice id, created unix ms, data)], oldest first.
        self._notices: dict[int, list[tuple[int, int, bytes]]] = {}
        self._next_notice = 1
        #: When true, every write fails with StorageFailed (nothing changes).
        self.fail_writes = False
        self._users: dict[int, UserRecord] = {}
        self._messages: dict[int, StoredMessage] = {}  # insertion order = arrival order

    def _refuse_write(self) -> Deferred[Any] | None:
        if self.fail_writes:
            return fail(StorageFailed("the disk refused the write"))
        return None

    def add_user(
        self, user_id: int, keys: KeyPair, enrollment_expires_ms: int | None
    ) -> Deferred[None]:
        if refused := self._refuse_write():
            return refused
        if user_id in self._users:
            return fail(UserExists(f"user {user_id} already exists"))
        self._users[user_id] = UserRecord(user_id, keys, enrollment_expires_ms)
        return succeed(None)

    def load_user(self, user_id: int) -> Deferred[UserRecord | None]:
        return succeed(self._users.get(user_id))

    def replace_user_keys(
        self, user_id: int, keys: KeyPair, replacing: Collection[KeyPair] | None = None
    ) -> Deferred[None]:
        if refused := self._refuse_write():
            return refused
        record = self._users.get(user_id)
        if record is None:
            return fail(UnknownUser(f"no user {user_id}"))
        if replacing is not None and record.keys not in replacing:
            return fail(KeysReplaced(f"the keys of user {user_id} were replaced meanwhile"))
        self._users[user_id] = evolve(record, keys=keys, enrollment_expires_ms=None)
        return succeed(None)

    def remove_user(self, user_id: int) -> Deferred[list[tuple[int, bytes]]]:
        if refused := self._refuse_write():
            return refused
        if self._users.pop(user_id, None) is None:
            return fail(UnknownUser(f"no user {user_id}"))
        doomed = [n for n, m in self._messages.items() if m.recipient == user_id]
        gone = [(self._messages[n].sender, self._messages[n].msg_id) for n in doomed]
        for file_id in doomed:
            del self._messages[file_id]
        self._notices.pop(user_id, None)
        return succeed(gone)

    def list_users(self) -> Deferred[list[int]]:
        return succeed(sorted(self._users))

    def enrollments(self) -> Deferred[dict[int, int]]:
        return succeed(
            {
                r.user_id: r.enrollment_expires_ms
                for r in self._users.values()
                if r.enrollment_expires_ms is not None
            }
        )

    def held_message(self, recipient: int, sender: int, msg_id: bytes) -> Deferred[int | None]:
        for message in self._messages.values():
            if (message.recipient, message.sender, message.msg_id) == (recipient, sender, msg_id):
                return succeed(message.file_id)
        return succeed(None)

    def store_message(
        self, recipient: int, sender: int, msg_id: bytes, blob: bytes
    ) -> Deferred[int]:
        if refused := self._refuse_write():
            return refused
        if recipient not in self._users:
            return fail(UnknownUser(f"no user {recipient}"))
        held = [m for m in self._messages.values() if m.recipient == recipient]
        for message in held:
            if message.sender == sender and message.msg_id == msg_id:
                return succeed(message.file_id)  # a resend: stored already
        if (
            len(held) + 1 > self.max_pending_count
            or sum(len(m.blob) for m in held) + len(blob) > self.max_pending_bytes
        ):
            return fail(QuotaExceeded(f"user {recipient} has too many pending messages"))
        while True:
            (file_id,) = struct.unpack(">Q", os.urandom(8))
            if file_id not in self._messages:
                break
        self._messages[file_id] = StoredMessage(file_id, recipient, sender, bytes(msg_id), blob)
        return succeed(file_id)

    def pending_for(self, recipient: int) -> Deferred[list[StoredMessage]]:
        return succeed([m for m in self._messages.values() if m.recipient == recipient])

    def remove_message(self, file_id: int) -> Deferred[None]:
        if refused := self._refuse_write():
            return refused
        self._messages.pop(file_id, None)
        return succeed(None)

    def pending_summary(self) -> Deferred[dict[int, PendingSummary]]:
        summary: dict[int, PendingSummary] = {}
        for message in self._messages.values():
            old = summary.get(message.recipient, PendingSummary(0, 0))
            summary[message.recipient] = PendingSummary(old.count + 1, old.size + len(message.blob))
        return succeed(summary)

    def inventory(self) -> Deferred[list[InventoryEntry]]:
        entries = [InventoryEntry(f"{uid}.user", 80, f"user {uid}") for uid in sorted(self._users)]
        entries += [
            InventoryEntry(f"{n}.msg", len(m.blob), f"message for {m.recipient}")
            for n, m in self._messages.items()
        ]
        entries += [
            InventoryEntry(f"{n}.notice", len(data), f"notice for {uid}")
            for uid, kept in self._notices.items()
            for n, _, data in kept
        ]
        return succeed(entries)

    def store_notice(self, user_id: int, data: bytes) -> Deferred[int]:
        if not 0 < len(data) <= MAX_NOTICE_DATA:
            return fail(ValueError(f"notice data is 1 to {MAX_NOTICE_DATA} bytes"))
        if refused := self._refuse_write():
            return refused
        if user_id not in self._users:
            return fail(UnknownUser(f"no user {user_id}"))
        notice_id, self._next_notice = self._next_notice, self._next_notice + 1
        kept = self._notices.setdefault(user_id, [])
        kept.append((notice_id, int(self._clock() * 1000), bytes(data)))
        del kept[: -self.max_notices]
        return succeed(notice_id)

    def notices_for(self, user_id: int) -> Deferred[list[tuple[int, bytes]]]:
        cutoff = int((self._clock() - self.notice_lifetime) * 1000)
        kept = [n for n in self._notices.get(user_id, []) if n[1] >= cutoff]
        if kept:
            self._notices[user_id] = kept
        else:
            self._notices.pop(user_id, None)
        return succeed([(notice_id, data) for notice_id, _, data in kept])

    def remove_notices(self, user_id: int, ids: list[int]) -> Deferred[None]:
        if refused := self._refuse_write():
            return refused
        doomed = set(ids)
        kept = [n for n in self._notices.get(user_id, []) if n[0] not in doomed]
        if kept:
            self._notices[user_id] = kept
        else:
            self._notices.pop(user_id, None)
        return succeed(None)
