"""The file-backed storage service (DESIGN.md §7; layout in docs/storage.rst).

State lives in memory (users, enrollment table, pending index) and on disk;
the disk is the truth and is read once, at :meth:`FileStorage.load`.  Every
later disk operation runs on the service's own bounded thread pool; the
reactor only keeps the index and the queues.

Pending-message stores and removals are group-committed: while one batch
is on the pool, new ones queue; the next batch writes every queued file to
its temporary name, fsyncs each, renames them into place, unlinks the
removed ones and fsyncs the directory once.  A store's Deferred fires only
after that directory fsync: the message is durable (DESIGN.md §4).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from bisect import insort
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredLock,
    ensureDeferred,
    fail,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from enclaves.atomic import (
    TEMP_SUFFIX,
    NotSynced,
    create_exclusive,
    fsync_dir,
    temp_name,
    write_atomic,
)
from enclaves.crypto import KeyPair, Sealer
from enclaves.storage.formats import (
    MAX_NOTICE_DATA,
    U64_MAX,
    FormatError,
    decode_enrollment,
    decode_msg,
    decode_notice,
    decode_user,
    encode_enrollment,
    encode_msg,
    encode_notice,
    encode_user,
    msg_file_name,
    notice_file_name,
    parse_msg_name,
    parse_notice_name,
    parse_user_name,
    user_file_name,
)
from enclaves.storage.interface import (
    MAX_NOTICES,
    NOTICE_LIFETIME,
    InventoryEntry,
    IStorage,
    KeysReplaced,
    PendingSummary,
    QuotaExceeded,
    StorageError,
    StorageFailed,
    StoredMessage,
    UnknownUser,
    UserExists,
    UserRecord,
)

__all__ = [
    "FileStorage",
    "USERS_DIR",
    "PENDING_DIR",
    "NOTICES_DIR",
    "QUARANTINE_DIR",
    "ENROLLMENT_FILE",
    "LOCK_FILE",
    "SEQ_SHIFT",
    "storage_failed",
]

USERS_DIR = "users"
PENDING_DIR = "pending"
NOTICES_DIR = "notices"
QUARANTINE_DIR = "quarantine"
ENROLLMENT_FILE = "enrollment.state"
LOCK_FILE = "lock"
#: A file id is ``arrival_sequence << SEQ_SHIFT | random``: the CMAC over
#: ``u64 n`` then authenticates the arrival order (docs/storage.rst).
SEQ_SHIFT = 16
#: Most operations in one group commit (each new file holds an fd until fsynced).
_MAX_BATCH = 128

_T = TypeVar("_T")

_DISK_ERRORS = {
    errno.ENOSPC: "the server's disk is full",
    errno.EDQUOT: "the server's disk quota is used up",
    errno.EROFS: "the server's data directory is read-only",
    errno.EACCES: "the server may not write its data directory (permission denied)",
    errno.EPERM: "the server may not write its data directory (operation not permitted)",
    errno.EFBIG: "the server hit its file size limit",
    errno.EIO: "the server's disk reported an I/O error",
}


def storage_failed(error: BaseException, what: str) -> StorageFailed:
    """A :class:`StorageFailed` naming ``what`` failed and why, safe to show a user."""
    if isinstance(error, OSError) and error.errno in _DISK_ERRORS:
        reason = _DISK_ERRORS[error.errno]
    elif isinstance(error, OSError) and error.strerror:
        reason = f"disk error: {error.strerror}"
    else:
        reason = "internal storage error"
    return StorageFailed(f"could not {what}: {reason}")


def _write_visible(path: Path, data: bytes) -> NotSynced | None:
    """:func:`write_atomic` at 0600; the :class:`NotSynced` if the file is in
    place but its directory's fsync failed (other errors raise)."""
    try:
        write_atomic(path, data, 0o600)
    except NotSynced as error:
        return error
    return None


def _message_key(sender: int, msg_id: bytes) -> bytes:
    """What makes a pending message for one recipient the same message again:
    ``u64 sender || msg_id`` (24 bytes; docs/storage.rst, "Resent messages")."""
    return sender.to_bytes(8, "big") + msg_id


@define
class _Pending:
    """One indexed pending message."""

    recipient: int
    size: int
    #: Its :func:`_message_key`, the key of ``FileStorage._keys[recipient]``.
    key: bytes = field(repr=False)


@define
class _Notice:
    """One indexed notice."""

    user_id: int
    created_ms: int


@define
class _NoticeWrite:
    """A notice file on its way to disk."""

    temp: Path
    final: Path
    data: bytes = field(repr=False)


@define
class _Store:
    """A store in flight: reserved against the quota until it finishes."""

    recipient: int
    size: int
    file_id: int
    temp: Path
    final: Path
    sender: int
    msg_id: bytes
    blob: bytes = field(repr=False)
    key: bytes = field(repr=False)
    #: Fires with None once the store has finished, either way.
    done: Deferred[None] = field(factory=Deferred)
    #: The callers waiting for its outcome: the one who asked, then any who
    #: asked to store the same message again meanwhile; fired in that order.
    waiters: list[Deferred[int]] = field(factory=list)

    def follow(self) -> Deferred[int]:
        """A Deferred that fires with this store's file id, or fails as it fails."""
        waiter: Deferred[int] = Deferred()
        self.waiters.append(waiter)
        return waiter


_Op = TypeVar("_Op")


class _CommitQueue(Generic[_Op]):
    """Operations on one directory, group-committed one pool job at a time:
    those that arrive while a batch is on the pool wait for the next."""

    def __init__(
        self,
        start: Callable[[list[_Op]], Deferred[list[BaseException | None]]],
        what: Callable[[_Op], str],
        done: Callable[[_Op], None],
        kind: str,
        log: Logger,
    ) -> None:
        self._start, self._what, self._done, self._kind, self._log = start, what, done, kind, log
        self._ready: list[tuple[_Op, Deferred[None]]] = []
        self._committing = False

    def add(self, op: _Op) -> Deferred[None]:
        """Queue ``op``; fires once it is durable (or fails with StorageError)."""
        d: Deferred[None] = Deferred()
        self._ready.append((op, d))
        if not self._committing:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._ready = self._ready[:_MAX_BATCH], self._ready[_MAX_BATCH:]
        self._committing = True

        def finished(result: list[BaseException | None] | Failure) -> None:
            # Still "committing" while the waiters' callbacks run: operations they
            # start must queue for the next batch, not start a batch of one.
            failed: list[str] = []
            for index, (op, waiting) in enumerate(batch):
                error = result.value if isinstance(result, Failure) else result[index]
                if error is None:
                    self._done(op)
                    waiting.callback(None)
                    continue
                if not isinstance(error, StorageError):
                    failed.append(str(error))
                    error = storage_failed(error, self._what(op))
                waiting.errback(Failure(error))
            if failed:
                # One line per batch, not per operation: a full disk fails them all.
                self._log.error(
                    "{failed} of {count} {kind} writes failed, e.g. {error}",
                    failed=len(failed),
                    count=len(batch),
                    kind=self._kind,
                    error=failed[0],
                )
            self._committing = False
            if self._ready:
                self._next()

        self._start([op for op, _ in batch]).addBoth(finished)


def _write_new(path: Path, data: bytes) -> int:
    """Create ``path`` (O_EXCL, no symlink) and write ``data``; returns the open fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _group_commit(
    directory: Path, ops: list[tuple[Path, Path, bytes] | list[Path]]
) -> list[BaseException | None]:
    """On the pool: one group commit in ``directory``.

    Each op is a new file ``(temp, final, data)`` or a list of files to
    unlink.  Write every new file to its temporary name, then fsync each (the
    first fsync's journal commit carries most of the others), rename them
    into place, unlink the removed ones, and fsync the directory once.
    Per-operation errors are returned, never raised; if the directory fsync
    fails the new files are taken back and nothing in the batch counts as done.
    """
    results: list[BaseException | None] = [None] * len(ops)
    open_files: list[tuple[int, int]] = []
    try:
        for index, op in enumerate(ops):
            if isinstance(op, tuple):
                try:
                    open_files.append((index, _write_new(op[0], op[2])))
                except OSError as error:
                    _unlink_quietly(op[0])
                    results[index] = error
        for index, fd in open_files:
            try:
                os.fsync(fd)
            except OSError as error:
                results[index] = error
    finally:
        for _, fd in open_files:
            os.close(fd)
    renamed: list[Path] = []
    for index, op in enumerate(ops):
        try:
            if isinstance(op, tuple):
                if results[index] is None:
                    os.rename(op[0], op[1])
                    renamed.append(op[1])
                else:
                    _unlink_quietly(op[0])
            else:
                for path in op:
                    _unlink_missing_ok(path)
        except OSError as error:
            if isinstance(op, tuple):
                _unlink_quietly(op[0])
            results[index] = error
    try:
        fsync_dir(directory)
    except OSError as error:
        # Not durable: take the new files back, fail everything in the batch.
        for path in renamed:
            _unlink_quietly(path)
        return [error for _ in ops]
    return results


def _read_regular(path: str | Path, limit: int = -1) -> bytes:
    """Read (up to ``limit`` bytes of) a stored file.  Anything but a regular
    file — a directory, a FIFO (opened without blocking), a symlink (not
    followed) — is :class:`FormatError`, so it is moved aside like a damaged
    file instead of stopping or hanging the server."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FormatError() from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError()
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@implementer(IStorage)
class FileStorage(Service):
    """Users and pending messages in ``data_dir``, sealed under the server key.

    Call :meth:`load` (or let :meth:`startService` call it) before use.  The
    thread pool runs between ``startService`` and ``stopService``.
    """

    log = Logger()

    def __init__(
        self,
        data_dir: Path,
        keys: KeyPair,
        *,
        max_pending_count: int = 1000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        threads: int = 4,
        reactor: Any = None,
        max_notices: int = MAX_NOTICES,
        notice_lifetime: float = NOTICE_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_pending_count < 1 or max_pending_bytes < 1 or threads < 1 or max_notices < 1:
            raise ValueError("quotas and thread count must be positive")
        self.data_dir = Path(data_dir)
        self.max_pending_count = max_pending_count
        self.max_pending_bytes = max_pending_bytes
        self.max_notices = max_notices
        self.notice_lifetime = notice_lifetime
        self._clock = clock
        self._sealer = Sealer(keys)
        self._threads = threads
        self._reactor = reactor
        self._users_dir = self.data_dir / USERS_DIR
        self._pending_dir = self.data_dir / PENDING_DIR
        self._notices_dir = self.data_dir / NOTICES_DIR
        self._quarantine_dir = self.data_dir / QUARANTINE_DIR
        self._pool: ThreadPool | None = None
        self._lock_fd: int | None = None
        self._loaded = False
        # In memory: the disk's truth, read once by load().
        self._users: dict[int, UserRecord] = {}
        self._enrollment: dict[int, int] = {}
        self._files: dict[int, _Pending] = {}
        self._by_recipient: dict[int, list[int]] = {}
        # recipient -> message key -> file id, for messages stored and being
        # stored: a resend of one is not stored again.
        self._keys: dict[int, dict[bytes, int]] = {}
        self._sizes: dict[int, int] = {}
        self._next_seq = 1
        self._notices: dict[int, _Notice] = {}
        self._notices_by_user: dict[int, list[int]] = {}
        self._next_notice_seq = 1
        # Notices are group-committed like messages, in batches of their own:
        # a recipient reading a backlog from offline senders makes one notice
        # per message, and one pool job per batch keeps them from crowding out
        # everything else on the pool.
        self._notice_queue: _CommitQueue[_NoticeWrite | list[int]] = _CommitQueue(
            lambda ops: self._in_pool("keep notices", self._apply_notice_batch, ops),
            lambda op: "keep the notice" if isinstance(op, _NoticeWrite) else "remove notices",
            lambda op: None,
            "notice",
            self.log,
        )
        # In flight.
        self._adding: set[int] = set()
        self._stores: dict[int, list[_Store]] = {}
        self._queue: _CommitQueue[_Store | int] = _CommitQueue(
            lambda ops: self._in_pool("store the message", self._apply_batch, ops),
            lambda op: "store the message" if isinstance(op, _Store) else "remove the message",
            lambda op: self._index(op) if isinstance(op, _Store) else self._unindex(op),
            "pending-message",
            self.log,
        )
        self._busy: set[Deferred[Any]] = set()
        self._meta = DeferredLock()

    # -- start and stop ----------------------------------------------------------

    def load(self) -> None:
        """Read the data directory synchronously; idempotent.

        Takes an exclusive lock on ``DATA_DIR/lock``, removes stray
        temporary files, loads users, enrollment state and the pending index,
        quarantining every file that fails its check.  Raises
        :class:`StorageFailed` (one line for the admin) if the directory is
        unusable, locked by another server, or the enrollment state fails
        its check.  Synchronous on purpose: it runs before the reactor and
        the listener start, so no client is ever served from half an index.
        """
        if self._loaded:
            return
        started = time.monotonic()
        self._users, self._enrollment = {}, {}
        self._files, self._by_recipient, self._sizes, self._keys = {}, {}, {}, {}
        self._notices, self._notices_by_user = {}, {}
        try:
            for directory in (
                self._users_dir,
                self._pending_dir,
                self._notices_dir,
                self._quarantine_dir,
            ):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise storage_failed(error, f"set up data directory {self.data_dir}") from None
        self._take_lock()
        try:
            self._clean_temps()
            bad: list[Path] = []
            good = self._load_users(bad) + self._load_pending(bad)
            expired = self._load_notices(bad)
            good += len(self._notices) + expired
            if len(bad) >= 2 and not good:
                # Not one file opens: far likelier a wrong key than damage.
                # Moving everything to quarantine would only make a mess.
                raise StorageFailed(
                    f"none of the {len(bad)} user and message files in {self.data_dir} "
                    "opens with this server key (is --key-file the key of this data "
                    "directory?); nothing was moved"
                )
            self._load_enrollment()
            for path in bad:
                self._quarantine_now(path)
            quarantined = len(bad)
        except BaseException:
            self._release_lock()
            raise
        orphans = sum(len(ids) for r, ids in self._by_recipient.items() if r not in self._users)
        self._loaded = True
        self.log.info(
            "storage loaded {users} users and {count} pending messages "
            "({orphans} for unknown users, {quarantined} files quarantined) "
            "and {notices} notices ({expired} expired ones dropped) in {seconds:.3f}s",
            users=len(self._users),
            count=len(self._files),
            notices=len(self._notices),
            expired=expired,
            orphans=orphans,
            quarantined=quarantined,
            seconds=time.monotonic() - started,
        )

    def _take_lock(self) -> None:
        path = self.data_dir / LOCK_FILE
        try:
            # Read-only: an fd open for writing would block a remount read-only.
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        except OSError as error:
            raise storage_failed(error, f"open {path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageFailed(
                f"another Enclaves server is using data directory {self.data_dir}"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_temps(self) -> None:
        for directory in (self.data_dir, self._users_dir, self._pending_dir, self._notices_dir):
            for entry in os.scandir(directory):
                if _is_temp(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    self.log.info("removed stray temporary file {path}", path=entry.path)

    def _load_enrollment(self) -> None:
        """Read the enrollment table and mark the loaded users enrolling."""
        path = self.data_dir / ENROLLMENT_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            raise storage_failed(error, f"read {path}") from None
        try:
            self._enrollment = decode_enrollment(self._sealer, data)
        except FormatError:
            raise StorageFailed(
                f"{path} failed its integrity check; restore it from a backup "
                "(see docs/storage.rst: moving it aside makes every enrolling "
                "user count as enrolled)"
            ) from None
        for user_id, expires in self._enrollment.items():
            if user_id in self._users:
                self._users[user_id] = UserRecord(user_id, self._users[user_id].keys, expires)
        stale = set(self._enrollment) - set(self._users)
        for user_id in stale:
            del self._enrollment[user_id]
        if stale:
            self.log.info("dropped {count} enrollment entries of missing users", count=len(stale))

    def _load_users(self, bad: list[Path]) -> int:
        """Read every user file; bad ones are added to ``bad``.  Returns the good count."""
        for entry in os.scandir(self._users_dir):
            user_id = parse_user_name(entry.name)
            if user_id is None:
                if not _is_temp(entry.name):
                    self.log.warn("ignoring unexpected file {path}", path=entry.path)
                continue
            try:
                data = _read_regular(entry.path, 81)
                keys = decode_user(self._sealer, user_id, data)
            except FormatError:
                bad.append(Path(entry.path))
                continue
            except OSError as error:
                raise storage_failed(error, f"read {entry.path}") from None
            self._users[user_id] = UserRecord(user_id, keys, None)
        return len(self._users)

    def _load_pending(self, bad: list[Path]) -> int:
        """Index every pending message; bad ones are added to ``bad``.  Returns the good count."""
        max_seq = 0
        for entry in os.scandir(self._pending_dir):
            file_id = parse_msg_name(entry.name)
            if file_id is None:
                if not _is_temp(entry.name):
                    self.log.warn("ignoring unexpected file {path}", path=entry.path)
                continue
            try:
                data = _read_regular(entry.path)
                record = decode_msg(self._sealer, file_id, data)
            except FormatError:
                bad.append(Path(entry.path))
                continue
            except OSError as error:
                raise storage_failed(error, f"read {entry.path}") from None
            key = _message_key(record.sender, record.msg_id)
            self._files[file_id] = _Pending(record.recipient, len(record.blob), key)
            self._by_recipient.setdefault(record.recipient, []).append(file_id)
            keys = self._keys.setdefault(record.recipient, {})
            if keys.get(key, file_id) >= file_id:  # copies stored twice (before): the oldest
                keys[key] = file_id
            self._sizes[record.recipient] = self._sizes.get(record.recipient, 0) + len(record.blob)
            max_seq = max(max_seq, file_id >> SEQ_SHIFT)
        for ids in self._by_recipient.values():
            ids.sort()
        self._next_seq = max_seq + 1
        return len(self._files)

    def _load_notices(self, bad: list[Path]) -> int:
        """Index every notice, deleting expired ones; bad ones are added to ``bad``.
        Returns the number of expired notices deleted."""
        cutoff = self._notice_cutoff_ms()
        max_seq = 0
        expired = 0
        for entry in os.scandir(self._notices_dir):
            file_id = parse_notice_name(entry.name)
            if file_id is None:
                if not _is_temp(entry.name):
                    self.log.warn("ignoring unexpected file {path}", path=entry.path)
                continue
            try:
                data = _read_regular(entry.path, MAX_NOTICE_DATA + 256)
                record = decode_notice(self._sealer, file_id, data)
            except FormatError:
                bad.append(Path(entry.path))
                continue
            except OSError as error:
                raise storage_failed(error, f"read {entry.path}") from None
            max_seq = max(max_seq, file_id >> SEQ_SHIFT)
            if record.created_ms < cutoff:
                try:
                    os.unlink(entry.path)
                except OSError as error:
                    raise storage_failed(error, f"delete {entry.path}") from None
                expired += 1
                continue
            self._notices[file_id] = _Notice(record.user_id, record.created_ms)
            self._notices_by_user.setdefault(record.user_id, []).append(file_id)
        for ids in self._notices_by_user.values():
            ids.sort()
        if expired:
            try:
                fsync_dir(self._notices_dir)
            except OSError as error:
                raise storage_failed(error, f"sync {self._notices_dir}") from None
        self._next_notice_seq = max_seq + 1
        return expired

    def _notice_cutoff_ms(self) -> int:
        """Notices created before this (unix ms) have expired."""
        return int((self._clock() - self.notice_lifetime) * 1000)

    def _quarantine_now(self, path: Path) -> Path | None:
        """Move a bad file aside (synchronously) and log it."""
        target = self._quarantine_dir / path.name
        counter = 0
        while target.exists():
            counter += 1
            target = self._quarantine_dir / f"{path.name}.{counter}"
        try:
            os.replace(path, target)
            fsync_dir(self._quarantine_dir)
            fsync_dir(path.parent)
        except FileNotFoundError:
            return None
        except OSError as error:
            self.log.error(
                "{path} failed its check and could not be moved aside: {error}",
                path=str(path),
                error=error.strerror,
            )
            return None
        self.log.error(
            "{path} failed its integrity check; moved to {target}",
            path=str(path),
            target=str(target),
        )
        return target

    def startService(self) -> None:
        self.load()
        self._pool = ThreadPool(minthreads=0, maxthreads=self._threads, name="enclaves-storage")
        self._pool.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Let every operation in flight finish, then stop the pool."""
        super().stopService()

        def stop(_: object) -> None:
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
            self._release_lock()
            self._loaded = False

        busy = list(self._busy)
        d: Deferred[Any] = DeferredList(busy, consumeErrors=True) if busy else succeed(None)
        return d.addCallback(stop)

    # -- plumbing ----------------------------------------------------------------

    def _get_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _in_pool(self, what: str, func: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run ``func`` on the pool; OSError and anything unexpected -> StorageFailed."""
        if self._pool is None:
            return fail(StorageFailed(f"could not {what}: storage is not running"))
        d = deferToThreadPool(self._get_reactor(), self._pool, func, *args)

        def translate(failure: Failure) -> Failure:
            if failure.check(StorageError):
                return failure
            if not failure.check(OSError):
                self.log.failure(
                    "unexpected storage error while trying to {what}", failure, what=what
                )
            else:
                self.log.error("could not {what}: {error}", what=what, error=str(failure.value))
            return Failure(storage_failed(cast(BaseException, failure.value), what))

        return self._track(d.addErrback(translate))

    def _track(self, d: Deferred[_T]) -> Deferred[_T]:
        self._busy.add(d)

        def done(result: _T) -> _T:
            self._busy.discard(d)
            return result

        return d.addBoth(done)

    def _check_running(self, what: str) -> StorageFailed | None:
        if not self.running or self._pool is None:
            return StorageFailed(f"could not {what}: storage is not running")
        return None

    # -- users -------------------------------------------------------------------

    def add_user(
        self, user_id: int, keys: KeyPair, enrollment_expires_ms: int | None
    ) -> Deferred[None]:
        if not 0 < user_id <= U64_MAX:
            return fail(ValueError("a user id is a non-zero u64"))
        if enrollment_expires_ms is not None and not 0 <= enrollment_expires_ms <= U64_MAX:
            return fail(ValueError("an expiry is a u64 of unix milliseconds"))
        error = self._check_running("add the user")
        if error:
            return fail(error)
        if user_id in self._users or user_id in self._adding:
            return fail(UserExists(f"user {user_id} already exists"))
        self._adding.add(user_id)
        data = encode_user(self._sealer, user_id, keys)

        async def add() -> None:
            try:
                if enrollment_expires_ms is not None:
                    table = dict(self._enrollment)
                    table[user_id] = enrollment_expires_ms
                    await self._write_enrollment(table)
                try:
                    await self._in_pool("store the user", self._create_user_file, user_id, data)
                except BaseException:
                    if enrollment_expires_ms is not None:
                        table = dict(self._enrollment)
                        table.pop(user_id, None)
                        try:
                            await self._write_enrollment(table)
                        except StorageError:
                            pass  # a stale entry is dropped at the next start
                    raise
                self._users[user_id] = UserRecord(user_id, keys, enrollment_expires_ms)
            finally:
                self._adding.discard(user_id)

        return self._locked(add)

    def _create_user_file(self, user_id: int, data: bytes) -> None:
        try:
            create_exclusive(self._users_dir / user_file_name(user_id), data, 0o600)
        except FileExistsError:
            raise UserExists(f"user {user_id} already exists") from None

    def _locked(self, func: Callable[[], Any]) -> Deferred[Any]:
        """Run the coroutine function ``func`` under the user/enrollment lock."""

        async def run() -> Any:
            await self._meta.acquire()
            try:
                return await func()
            finally:
                self._meta.release()

        return self._track(ensureDeferred(run()))

    async def _write_enrollment(self, table: dict[int, int]) -> None:
        """Write the enrollment table durably, then adopt it.  Caller holds the lock."""
        data = encode_enrollment(self._sealer, table)
        await self._in_pool(
            "save the enrollment state", write_atomic, self.data_dir / ENROLLMENT_FILE, data, 0o600
        )
        self._enrollment = table

    def load_user(self, user_id: int) -> Deferred[UserRecord | None]:
        """From memory: cheap enough for every handshake."""
        return succeed(self._users.get(user_id))

    def replace_user_keys(
        self, user_id: int, keys: KeyPair, replacing: Collection[KeyPair] | None = None
    ) -> Deferred[None]:
        error = self._check_running("store the new keys")
        if error:
            return fail(error)
        if user_id not in self._users:
            return fail(UnknownUser(f"no user {user_id}"))
        data = encode_user(self._sealer, user_id, keys)

        async def replace() -> None:
            if user_id not in self._users:
                raise UnknownUser(f"no user {user_id}")
            if replacing is not None and self._users[user_id].keys not in replacing:
                # Another rotation was stored first (under this same lock).
                raise KeysReplaced(f"the keys of user {user_id} were replaced meanwhile")
            # Keys first: a crash in between leaves the new keys still
            # enrolling, never the token's keys enrolled.
            path = self._users_dir / user_file_name(user_id)
            old = self._users[user_id]
            unsynced = await self._in_pool("store the new keys", _write_visible, path, data)
            if unsynced is not None:
                # The new file is in place but might not survive a crash: a
                # ROTATED now could leave the client with keys the server
                # forgets.  Put the old file back and fail; if even that
                # fails before its rename, memory follows the disk.
                self.log.error(
                    "could not store the new keys of user {user_id}: {error}",
                    user_id=user_id,
                    error=str(unsynced),
                )
                previous = encode_user(self._sealer, user_id, old.keys)
                try:
                    await self._in_pool("restore the old keys", _write_visible, path, previous)
                except StorageError:
                    if user_id in self._users:
                        self._users[user_id] = UserRecord(user_id, keys, old.enrollment_expires_ms)
                raise storage_failed(unsynced, "store the new keys")
            if user_id not in self._users:
                # Revoked while the file was written (remove_user takes the
                # user out of memory at once and deletes the file after us):
                # the user stays gone.
                raise UnknownUser(f"no user {user_id}")
            self._users[user_id] = UserRecord(user_id, keys, old.enrollment_expires_ms)
            if user_id in self._enrollment:
                table = dict(self._enrollment)
                del table[user_id]
                try:
                    await self._write_enrollment(table)
                except StorageError:
                    # Put the old keys back so that the failure is the whole
                    # truth; if even that fails, memory follows the disk.
                    previous = encode_user(self._sealer, user_id, old.keys)
                    try:
                        await self._in_pool(
                            "restore the old keys", write_atomic, path, previous, 0o600
                        )
                        if user_id in self._users:
                            self._users[user_id] = old
                    except StorageError:
                        pass
                    raise
            if user_id not in self._users:
                raise UnknownUser(f"no user {user_id}")  # revoked meanwhile, as above
            self._users[user_id] = UserRecord(user_id, keys, None)

        return self._locked(replace)

    def remove_user(self, user_id: int) -> Deferred[list[tuple[int, bytes]]]:
        error = self._check_running("remove the user")
        if error:
            return fail(error)
        record = self._users.pop(user_id, None)
        if (
            record is None
            and user_id not in self._by_recipient
            and user_id not in self._notices_by_user
        ):
            return fail(UnknownUser(f"no user {user_id}"))
        # An unknown id with pending messages (its user file was quarantined):
        # remove the orphaned messages.

        async def remove() -> list[tuple[int, bytes]]:
            # Gone from memory first: no new store or handshake for it.
            deleted: list[int] = []
            gone: list[tuple[int, bytes]] = []
            try:
                in_flight = [s.done for s in self._stores.get(user_id, [])]
                if in_flight:
                    await DeferredList(in_flight, consumeErrors=True)
                ids = list(self._by_recipient.get(user_id, []))
                notices = self._notices_by_user.pop(user_id, [])
                for notice_id in notices:
                    self._notices.pop(notice_id, None)
                await self._in_pool(
                    "remove the user", self._delete_user_files, user_id, ids, notices, deleted, gone
                )
            except BaseException:
                if record is not None:
                    self._users[user_id] = record
                raise
            finally:
                for file_id in deleted:
                    self._unindex(file_id)
            if user_id in self._enrollment:
                table = dict(self._enrollment)
                del table[user_id]
                try:
                    await self._write_enrollment(table)
                except StorageError:
                    pass  # the entry of a missing user is dropped at the next start
            return gone

        return self._locked(remove)

    def _delete_user_files(
        self,
        user_id: int,
        ids: list[int],
        notices: list[int],
        deleted: list[int],
        gone: list[tuple[int, bytes]],
    ) -> None:
        """On the pool: messages and notices first, then the user file; ``deleted``
        records the messages' progress, ``gone`` their senders and ids."""
        for file_id in ids:
            path = self._pending_dir / msg_file_name(file_id)
            try:
                record = decode_msg(self._sealer, file_id, _read_regular(path))
            except (OSError, FormatError):
                record = None  # missing or damaged: deleted all the same
            _unlink_missing_ok(path)
            deleted.append(file_id)
            if record is not None:
                gone.append((record.sender, record.msg_id))
        if ids:
            fsync_dir(self._pending_dir)
        for notice_id in notices:
            _unlink_missing_ok(self._notices_dir / notice_file_name(notice_id))
        if notices:
            fsync_dir(self._notices_dir)
        _unlink_missing_ok(self._users_dir / user_file_name(user_id))
        fsync_dir(self._users_dir)

    def list_users(self) -> Deferred[list[int]]:
        return succeed(sorted(self._users))

    def enrollments(self) -> Deferred[dict[int, int]]:
        return succeed(dict(self._enrollment))

    # -- pending messages --------------------------------------------------------

    def held_message(self, recipient: int, sender: int, msg_id: bytes) -> Deferred[int | None]:
        held = self._held_copy(recipient, _message_key(sender, bytes(msg_id)))
        return succeed(None) if held is None else cast("Deferred[int | None]", held)

    def _held_copy(self, recipient: int, key: bytes) -> Deferred[int] | None:
        """The file id of the copy indexed under ``key`` (a store in flight:
        once durable, or its failure), or None if none is held."""
        known = self._keys.get(recipient, {}).get(key)
        if known is None:
            return None
        if known in self._files:
            return succeed(known)
        for twin in self._stores.get(recipient, ()):
            if twin.file_id == known:
                return self._track(twin.follow())
        return None

    def store_message(
        self, recipient: int, sender: int, msg_id: bytes, blob: bytes
    ) -> Deferred[int]:
        if len(msg_id) != 16 or not 0 <= sender <= U64_MAX:
            return fail(ValueError("msg_id is 16 bytes and sender a u64"))
        error = self._check_running("store the message")
        if error:
            return fail(error)
        if recipient not in self._users:
            return fail(UnknownUser(f"no user {recipient}"))
        key = _message_key(sender, bytes(msg_id))
        held = self._held_copy(recipient, key)
        if held is not None:
            # A resend: the copy stored (or being stored) answers it, and
            # nothing more is stored or counted against the quota.
            return held
        in_flight = self._stores.setdefault(recipient, [])
        count = len(self._by_recipient.get(recipient, ())) + len(in_flight)
        size = self._sizes.get(recipient, 0) + sum(s.size for s in in_flight)
        if count + 1 > self.max_pending_count:
            return fail(
                QuotaExceeded(
                    f"recipient {recipient} already has {count} pending messages "
                    f"(limit {self.max_pending_count})"
                )
            )
        if size + len(blob) > self.max_pending_bytes:
            return fail(
                QuotaExceeded(
                    f"recipient {recipient} has {size} bytes pending; "
                    f"{len(blob)} more would pass the limit of {self.max_pending_bytes}"
                )
            )
        (salt,) = struct.unpack(">H", os.urandom(2))
        file_id = self._next_seq << SEQ_SHIFT | salt
        self._next_seq += 1
        name = msg_file_name(file_id)
        store = _Store(
            recipient,
            len(blob),
            file_id,
            self._pending_dir / f".{name}.{os.getpid()}{TEMP_SUFFIX}",
            self._pending_dir / name,
            sender,
            bytes(msg_id),
            bytes(blob),
            key,
        )
        in_flight.append(store)
        self._keys.setdefault(recipient, {})[key] = file_id
        answer = self._track(store.follow())

        def finished(result: Failure | None) -> None:
            flight = self._stores.get(recipient, [])
            if store in flight:
                flight.remove(store)
            if not flight:
                self._stores.pop(recipient, None)
            if isinstance(result, Failure):
                self._forget_key(recipient, key, file_id)
            store.done.callback(None)
            for waiter in store.waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(file_id)

        self._queue.add(store).addBoth(finished)
        return answer

    def _apply_batch(self, ops: list[_Store | int]) -> list[BaseException | None]:
        """On the pool: seal the new message files and group-commit the batch
        (:func:`_group_commit`); an int is the file id of a message to unlink."""
        return _group_commit(
            self._pending_dir,
            [
                (
                    op.temp,
                    op.final,
                    encode_msg(
                        self._sealer, op.file_id, op.recipient, op.sender, op.msg_id, op.blob
                    ),
                )
                if isinstance(op, _Store)
                else [self._pending_dir / msg_file_name(op)]
                for op in ops
            ],
        )

    def _index(self, store: _Store) -> None:
        self._files[store.file_id] = _Pending(store.recipient, store.size, store.key)
        insort(self._by_recipient.setdefault(store.recipient, []), store.file_id)
        self._sizes[store.recipient] = self._sizes.get(store.recipient, 0) + store.size

    def _unindex(self, file_id: int) -> None:
        pending = self._files.pop(file_id, None)
        if pending is None:
            return
        ids = self._by_recipient.get(pending.recipient, [])
        if file_id in ids:
            ids.remove(file_id)
        self._sizes[pending.recipient] = self._sizes.get(pending.recipient, 0) - pending.size
        self._forget_key(pending.recipient, pending.key, file_id)
        if not ids:
            self._by_recipient.pop(pending.recipient, None)
            self._sizes.pop(pending.recipient, None)

    def _forget_key(self, recipient: int, key: bytes, file_id: int) -> None:
        """``key`` no longer names ``file_id`` (gone, or its store failed)."""
        keys = self._keys.get(recipient)
        if keys is not None and keys.get(key) == file_id:
            del keys[key]
            if not keys:
                del self._keys[recipient]

    def pending_for(self, recipient: int) -> Deferred[list[StoredMessage]]:
        ids = list(self._by_recipient.get(recipient, ()))
        if not ids:
            return succeed([])
        d = self._in_pool("read pending messages", self._read_messages, ids)

        def adopt(result: tuple[list[StoredMessage], list[tuple[int, str | None]]]) -> Any:
            messages, bad = result
            for file_id, target in bad:
                self._unindex(file_id)
                self.log.error(
                    "pending message {name} failed its integrity check; {where}",
                    name=msg_file_name(file_id),
                    where=f"moved to {target}" if target else "could not be moved aside",
                )
            return [m for m in messages if m.recipient == recipient]

        return d.addCallback(adopt)

    def _read_messages(
        self, ids: list[int]
    ) -> tuple[list[StoredMessage], list[tuple[int, str | None]]]:
        messages: list[StoredMessage] = []
        bad: list[tuple[int, str | None]] = []
        for file_id in ids:
            path = self._pending_dir / msg_file_name(file_id)
            try:
                data = _read_regular(path)
                record = decode_msg(self._sealer, file_id, data)
            except FileNotFoundError:
                continue  # removed meanwhile
            except FormatError:
                target = self._move_aside(path)
                bad.append((file_id, str(target) if target else None))
                continue
            messages.append(
                StoredMessage(file_id, record.recipient, record.sender, record.msg_id, record.blob)
            )
        return messages, bad

    def _move_aside(self, path: Path) -> Path | None:
        """On the pool: move a bad file to quarantine; no logging off the reactor."""
        target = self._quarantine_dir / path.name
        counter = 0
        while target.exists():
            counter += 1
            target = self._quarantine_dir / f"{path.name}.{counter}"
        try:
            os.replace(path, target)
            fsync_dir(self._quarantine_dir)
            fsync_dir(path.parent)
        except OSError:
            return None
        return target

    def remove_message(self, file_id: int) -> Deferred[None]:
        if file_id not in self._files:
            return succeed(None)
        error = self._check_running("remove the message")
        if error:
            return fail(error)
        return self._track(self._queue.add(file_id))

    def pending_summary(self) -> Deferred[dict[int, PendingSummary]]:
        return succeed(
            {
                recipient: PendingSummary(len(ids), self._sizes.get(recipient, 0))
                for recipient, ids in self._by_recipient.items()
            }
        )

    def inventory(self) -> Deferred[list[InventoryEntry]]:
        # Copies made here, on the reactor: the pool thread must not iterate
        # dicts the reactor is changing.
        return self._in_pool(
            "list the data directory",
            self._inventory,
            dict(self._users),
            dict(self._files),
            dict(self._notices),
        )

    def _inventory(
        self,
        users: dict[int, UserRecord],
        files: dict[int, _Pending],
        notices: dict[int, _Notice],
    ) -> list[InventoryEntry]:
        entries: list[InventoryEntry] = []

        def add(path: Path, description: str) -> None:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return
            if description == _UNEXPECTED and _is_temp(path.name):
                description = "temporary file of a write in progress (or stray)"
            entries.append(InventoryEntry(str(path.relative_to(self.data_dir)), size, description))

        for name in sorted(os.listdir(self.data_dir)):
            path = self.data_dir / name
            if path.is_dir():
                continue
            add(path, _TOP_LEVEL.get(name, _UNEXPECTED))
        for name in sorted(os.listdir(self._users_dir)):
            user_id = parse_user_name(name)
            record = users.get(user_id) if user_id is not None else None
            if record is None:
                add(self._users_dir / name, _UNEXPECTED)
            else:
                state = "enrolling" if record.enrolling else "enrolled"
                add(self._users_dir / name, f"user {user_id} ({state})")
        for name in sorted(os.listdir(self._pending_dir)):
            file_id = parse_msg_name(name)
            pending = files.get(file_id) if file_id is not None else None
            if pending is None:
                add(self._pending_dir / name, _UNEXPECTED)
            else:
                add(
                    self._pending_dir / name,
                    f"pending message for {pending.recipient} ({pending.size} bytes)",
                )
        for name in sorted(os.listdir(self._notices_dir)):
            notice_id = parse_notice_name(name)
            notice = notices.get(notice_id) if notice_id is not None else None
            if notice is None:
                add(self._notices_dir / name, _UNEXPECTED)
            else:
                add(self._notices_dir / name, f"notice for {notice.user_id}")
        for name in sorted(os.listdir(self._quarantine_dir)):
            add(self._quarantine_dir / name, "quarantined: failed its integrity check")
        return entries

    # -- notices -----------------------------------------------------------------

    def store_notice(self, user_id: int, data: bytes) -> Deferred[int]:
        if not 0 < user_id <= U64_MAX or not 0 < len(data) <= MAX_NOTICE_DATA:
            return fail(ValueError(f"a notice is for a user and 1 to {MAX_NOTICE_DATA} bytes"))
        error = self._check_running("keep the notice")
        if error:
            return fail(error)
        if user_id not in self._users:
            return fail(UnknownUser(f"no user {user_id}"))
        (salt,) = struct.unpack(">H", os.urandom(2))
        notice_id = self._next_notice_seq << SEQ_SHIFT | salt
        self._next_notice_seq += 1
        created_ms = int(self._clock() * 1000)
        blob = encode_notice(self._sealer, notice_id, user_id, created_ms, bytes(data))
        path = self._notices_dir / notice_file_name(notice_id)
        write = _NoticeWrite(temp_name(path), path, blob)

        async def store() -> int:
            await self._notice_queue.add(write)
            if user_id not in self._users:
                # Removed while the file was written: it goes too.
                await self._notice_queue.add([notice_id])
                raise UnknownUser(f"no user {user_id}")
            self._notices[notice_id] = _Notice(user_id, created_ms)
            ids = self._notices_by_user.setdefault(user_id, [])
            insort(ids, notice_id)
            if len(ids) > self.max_notices:
                doomed = ids[: len(ids) - self.max_notices]
                self.log.warn(
                    "user {user_id} has more than {limit} notices; dropping the {count} oldest",
                    user_id=user_id,
                    limit=self.max_notices,
                    count=len(doomed),
                )
                self._forget_notices(user_id, doomed)
            return notice_id

        return self._track(ensureDeferred(store()))

    def _forget_notices(self, user_id: int, ids: list[int]) -> None:
        """Drop notices from the index now and from the disk soon (failures logged:
        a notice left on disk is read again at the next start, at worst a repeat)."""
        self._unindex_notices(user_id, ids)
        self._track(self._notice_queue.add(list(ids))).addErrback(
            lambda failure: self.log.warn(
                "could not delete dropped notices: {error}", error=str(failure.value)
            )
        )

    def _unindex_notices(self, user_id: int, ids: list[int]) -> None:
        """Drop notices from the index (one pass over the user's list: a
        user may hold up to ``max_notices``)."""
        gone = {n for n in ids if self._notices.pop(n, None) is not None}
        if not gone:
            return
        left = [n for n in self._notices_by_user.get(user_id, []) if n not in gone]
        if left:
            self._notices_by_user[user_id] = left
        else:
            self._notices_by_user.pop(user_id, None)

    def _apply_notice_batch(
        self, ops: list[_NoticeWrite | list[int]]
    ) -> list[BaseException | None]:
        """On the pool: group-commit a batch of notice writes and removals
        (:func:`_group_commit`), as :meth:`_apply_batch` does for messages."""
        return _group_commit(
            self._notices_dir,
            [
                (op.temp, op.final, op.data)
                if isinstance(op, _NoticeWrite)
                else [self._notices_dir / notice_file_name(n) for n in op]
                for op in ops
            ],
        )

    def notices_for(self, user_id: int) -> Deferred[list[tuple[int, bytes]]]:
        cutoff = self._notice_cutoff_ms()
        ids = list(self._notices_by_user.get(user_id, ()))
        expired = [n for n in ids if self._notices[n].created_ms < cutoff]
        if expired:
            self.log.info(
                "dropping {count} expired notices of user {user_id}",
                count=len(expired),
                user_id=user_id,
            )
            self._forget_notices(user_id, expired)
            gone = set(expired)
            ids = [n for n in ids if n not in gone]
        if not ids:
            return succeed([])
        d = self._in_pool("read notices", self._read_notices, user_id, ids)

        def adopt(result: tuple[list[tuple[int, bytes]], list[tuple[int, str | None]]]) -> Any:
            notices, bad = result
            self._unindex_notices(user_id, [notice_id for notice_id, _ in bad])
            for notice_id, target in bad:
                self.log.error(
                    "notice {name} failed its integrity check; {where}",
                    name=notice_file_name(notice_id),
                    where=f"moved to {target}" if target else "could not be moved aside",
                )
            return notices

        return d.addCallback(adopt)

    def _read_notices(
        self, user_id: int, ids: list[int]
    ) -> tuple[list[tuple[int, bytes]], list[tuple[int, str | None]]]:
        notices: list[tuple[int, bytes]] = []
        bad: list[tuple[int, str | None]] = []
        for notice_id in ids:
            path = self._notices_dir / notice_file_name(notice_id)
            try:
                data = _read_regular(path, MAX_NOTICE_DATA + 256)
                record = decode_notice(self._sealer, notice_id, data)
                if record.user_id != user_id:
                    raise FormatError()
            except FileNotFoundError:
                continue  # removed meanwhile
            except FormatError:
                target = self._move_aside(path)
                bad.append((notice_id, str(target) if target else None))
                continue
            notices.append((notice_id, record.data))
        return notices, bad

    def remove_notices(self, user_id: int, ids: list[int]) -> Deferred[None]:
        have = set(self._notices_by_user.get(user_id, ()))
        known = [n for n in ids if n in have]
        if not known:
            return succeed(None)
        error = self._check_running("remove notices")
        if error:
            return fail(error)
        d = self._track(self._notice_queue.add(known))

        def removed(_: None) -> None:
            self._unindex_notices(user_id, known)

        return d.addCallback(removed)


_UNEXPECTED = "unexpected file"
_TOP_LEVEL = {
    "server.key": "server key",
    "server.check": "server key check",
    ENROLLMENT_FILE: "enrollment state",
    LOCK_FILE: "lock file (empty)",
}


def _unlink_missing_ok(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
