"""The router: who is online, where each message goes, and when the sender hears ACCEPTED.

Transport-free: it talks to live sessions through the small :class:`Peer`
protocol (``user_id``, ``send``, ``close``) and to the disk through
:class:`~enclaves.storage.interface.IStorage`.  The delivery guarantee of
DESIGN.md §4 lives here: ACCEPTED is sent only after the recipient's RECEIVED
or after the storage Deferred fired (fsynced); a message in flight to a
recipient who disconnects is stored, or its sender gets an ERROR.  A resend
of a message the server still holds (being stored, stored, or out to the
recipient) is answered from that copy, never stored or delivered twice.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from enclaves.crypto import KeyPair
from enclaves.enrollment import DEFAULT_TOKEN_LIFETIME, create_enrollment
from enclaves.frames import DEFAULT_MAX_FRAME, MAX_FRAME, ErrorCode
from enclaves.inner import (
    NO_MSG_ID,
    Accepted,
    Delivered,
    Error,
    InnerError,
    InnerMessage,
    Invite,
    InviteToken,
    Joined,
    Ping,
    Pong,
    Received,
    Removed,
    Rotate,
    Rotated,
    Send,
    ServerInbound,
    checked_accepted,
    decode_all,
    encode,
    encoded_accepted_delivered,
    encoded_deliver,
    kind_name,
    routed_message,
    routed_send,
    split_directory,
)
from enclaves.server.limits import TokenBucket
from enclaves.session import max_blob_size, max_inner_size
from enclaves.storage.interface import (
    IStorage,
    KeysReplaced,
    QuotaExceeded,
    StorageError,
    UnknownUser,
    UserRecord,
)

__all__ = ["DEFAULT_MESSAGE_RATE", "Peer", "Router", "ServerStats"]

DEFAULT_MESSAGE_RATE = 500
DEFAULT_MAX_INFLIGHT = 1000
INVITES_PER_HOUR = 5  # per inviting user, bursts up to this many
DEFAULT_MAX_ENROLLMENTS = 1000  # outstanding (unexpired, not rotated) server-wide
ENROLLMENT_PURGE_AFTER = 7 * 24 * 3600  # seconds after expiry an unused enrollment goes


class Peer(Protocol):
    """What the router needs from a live, authenticated session."""

    user_id: int

    def send(self, message: InnerMessage) -> None:
        """Queue one inner message (coalesced and sealed on the next write)."""

    def send_encoded(self, data: bytes) -> None:
        """Queue inner messages already encoded (``encode``'s bytes), as :meth:`send`."""

    def close(self, code: ErrorCode, text: str) -> None:
        """Send a sealed ERROR and drop; the router's :meth:`Router.logout` follows."""


@frozen
class ServerStats:
    """A snapshot of the router's counters."""

    connections: int
    sessions: int
    messages_routed: int
    messages_stored: int
    messages_delivered: int
    started_at: float
    taken_at: float = field(factory=time.time)
    #: DELIVERED and per-message ERRORs kept on disk for a sender who was offline.
    notices_kept: int = 0
    #: Connections refused as soon as they were made, since start: the server
    #: was full (SERVER_BUSY), the address was backing off after failed
    #: handshakes, or it had its share of connections not logged in yet
    #: (both RATE_LIMITED).
    refused_busy: int = 0
    refused_backoff: int = 0
    refused_share: int = 0

    @property
    def uptime(self) -> float:
        """Seconds since the router started, at the time of the snapshot."""
        return max(0.0, self.taken_at - self.started_at)


@define(eq=False)
class _Item:
    """A message on its way to one recipient; ``file_id`` once stored."""

    sender: int
    msg_id: bytes
    blob: bytes = field(repr=False)
    file_id: int | None = None
    # Acknowledged while its store (begun when the window filled) was in
    # flight: the copy is deleted once written.
    acked: bool = False


@define(eq=False)
class _Online:
    """The router's view of one live session."""

    peer: Peer
    enrolling: bool
    expires_ms: int | None
    bucket: TokenBucket
    ready: bool = False  # pending messages loaded; live deliveries go straight out
    # The login read of stored notices has been asked for: a notice kept from
    # now on is sent live (the read could not have seen it).
    notices_asked: bool = False
    # Notices sent and not yet acknowledged: the nonce of the PING sent after
    # them -> their ids.  The matching PONG deletes them.
    notice_pings: dict[int, list[int]] = field(factory=dict)
    closed: bool = False
    backlog: list[_Item] = field(factory=list)
    # Flow control: at most ``max_inflight`` unacknowledged DELIVERs; beyond
    # that new messages wait in storage ("spilled") until the window drains.
    spilled: bool = False
    refilling: bool = False
    missed: bool = False
    # A stored message waits for this msg_id's RECEIVED: another sender's
    # message under the same msg_id is out (see Router._twin_out).
    collision: bytes | None = None
    inflight: dict[bytes, list[_Item]] = field(factory=dict)
    sent_files: set[int] = field(factory=set)
    keys: KeyPair | None = None  # what it logged in with
    # Keys of its ROTATEs still being stored: with ``keys``, what the user's
    # keys may be when its next ROTATE is stored, if no other session rotated
    # meanwhile.
    rotating: tuple[KeyPair, ...] = ()


# The largest blob whose DELIVER fits a frame every client accepts.  One stored
# under a larger --max-frame than now goes alone in a frame up to this size
# (enclaves.session.Session.seal).
_MAX_DELIVERABLE = max_blob_size(MAX_FRAME)

# Why a session that logged in with keys a ROTATE has replaced is closed.
STALE_KEYS = "this account's keys were replaced while this session logged in"

# The ERROR a sender gets for an accepted message no frame can carry (deleted).
UNDELIVERABLE = (
    "accepted by an earlier run of this server, but larger than any client can "
    "receive (65,536-byte frames): deleted unread"
)

# The ERROR a sender gets for an accepted message deleted unread by a revocation.
REVOKED_UNREAD = "the recipient was revoked before reading it"


def _error(code: ErrorCode, text: str, msg_id: bytes = NO_MSG_ID) -> Error:
    return Error(int(code), msg_id, text)


class Router:
    """Routes between live sessions and storage; one live session per user.

    ``clock`` is an ``IReactorTime`` (the reactor, or a ``task.Clock`` in
    tests); its ``seconds()`` is Unix time for token expiry and statistics.
    """

    log = Logger()

    def __init__(
        self,
        storage: IStorage,
        clock: Any,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        message_rate: int = DEFAULT_MESSAGE_RATE,
        allow_invites: bool = False,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_enrollments: int = DEFAULT_MAX_ENROLLMENTS,
        invites_per_hour: int = INVITES_PER_HOUR,
    ) -> None:
        self.storage: Any = storage  # IStorage; its methods return Deferreds
        self.clock = clock
        self.message_rate = message_rate
        self.allow_invites = allow_invites
        self.token_lifetime = token_lifetime
        self.max_inflight = max(max_inflight, 2)
        if max_frame > MAX_FRAME:
            raise ValueError(f"max_frame {max_frame} is above the protocol's {MAX_FRAME}")
        # The largest blob taken: its DELIVER must fit a frame this server sends.
        self.max_blob = min(max_blob_size(max_frame), int(storage.max_pending_bytes))
        self.max_frame = max_frame
        self.max_enrollments = max_enrollments
        self.invites_per_hour = invites_per_hour
        self._invite_buckets: dict[int, TokenBucket] = {}  # inviter -> bucket
        self._inviting = 0  # INVITEs between the cap check and the stored user
        self._online: dict[int, _Online] = {}
        self._by_peer: dict[int, _Online] = {}  # id(peer) -> state
        # Stores in flight per recipient, and who waits for them to finish: a
        # message must never overtake an older one still being written
        # (arrival order, docs/protocol.rst).
        self._storing: dict[int, int] = {}
        self._settle_waiters: dict[int, list[Deferred[None]]] = {}
        # The same stores by message, (recipient, sender, msg_id): a resend of a
        # message being stored waits for that store's outcome instead.
        self._storing_messages: set[tuple[int, int, bytes]] = set()
        # Stored copies whose removal is being written: storage lists them
        # until it is, and a login's or a refill's read must not send them
        # again (a recipient that reconnects just after acknowledging).
        self._removing: set[int] = set()
        self.connections = 0
        self.messages_routed = 0
        self.messages_stored = 0
        self.messages_delivered = 0
        self.notices_kept = 0
        self.refused = {"busy": 0, "backoff": 0, "share": 0}
        # Ids revoked since start: a connection that authenticated just before
        # (its record loaded, WELCOME sent) must not go live after.  Ids are
        # random and never reused; revocations are the admin's, so few.
        self._revoked: set[int] = set()
        # The keys each ROTATE since start stored: a connection that logged in
        # with a user's previous keys (the token's, or keys replaced because a
        # device was suspect) must not go live, or stay live, after.
        self._rotated: dict[int, KeyPair] = {}
        self.started_at = float(self.clock.seconds())

    # -- admin surface ------------------------------------------------------------

    def is_online(self, user_id: int) -> bool:
        """True while ``user_id`` has a live authenticated session."""
        state = self._online.get(user_id)
        return state is not None and not state.closed

    def online_users(self) -> list[int]:
        return sorted(uid for uid, state in self._online.items() if not state.closed)

    def stats(self) -> ServerStats:
        return ServerStats(
            connections=self.connections,
            sessions=len(self._online),
            messages_routed=self.messages_routed,
            messages_stored=self.messages_stored,
            messages_delivered=self.messages_delivered,
            started_at=self.started_at,
            taken_at=float(self.clock.seconds()),
            notices_kept=self.notices_kept,
            refused_busy=self.refused["busy"],
            refused_backoff=self.refused["backoff"],
            refused_share=self.refused["share"],
        )

    def revoke(self, user_id: int) -> Deferred[int]:
        """Remove ``user_id`` and its pending messages, close its session with
        REVOKED and tell everyone online REMOVED; the sender of each deleted
        message gets an ERROR for it (a notice if offline).  Fires with the
        number of pending messages deleted; fails with UnknownUser if there is
        no such user.  The session ends, and no login of the user goes live,
        from the moment storage starts removing it, not once it has."""

        def end_session() -> None:
            state = self._online.pop(user_id, None)
            if state is not None:
                self._abandon(state, "the recipient was revoked")
                state.peer.close(ErrorCode.REVOKED, "the admin revoked this account")

        def removed(gone: list[tuple[int, bytes]], announced: bool) -> int:
            if announced:  # a user that never finished enrolling was never listed
                self._broadcast(Removed(user_id), exclude=user_id)
            for sender, msg_id in gone:
                if sender != user_id:
                    self._notify(
                        sender, _error(ErrorCode.UNKNOWN_RECIPIENT, REVOKED_UNREAD, msg_id)
                    )
            self.log.info(
                "revoked user {user_id}, {count} pending deleted", user_id=user_id, count=len(gone)
            )
            return len(gone)

        async def revoke() -> int:
            announced = user_id not in await self.storage.enrollments()
            removal = self.storage.remove_user(user_id)
            refused: list[Failure] = []  # at once: nothing was removed

            def note(failure: Failure) -> Failure:
                refused.append(failure)
                return failure

            removal.addErrback(note)
            # The revocation takes effect now, not once the files are deleted
            # (that takes a while): the session ends, and no connection of the
            # user goes live, so nothing more is done as this user.
            first = not refused and user_id not in self._revoked
            if not refused:
                self._revoked.add(user_id)
                end_session()
            try:
                gone = await removal
            except UnknownUser:
                raise  # gone all the same: it stays refused
            except BaseException:
                # Storage kept (or put back) the user and says why; the admin
                # revokes again.  Until then it may log in again.
                if first:
                    self._revoked.discard(user_id)
                raise
            return removed(gone, announced)

        return ensureDeferred(revoke())

    def notify_joined(self, user_id: int) -> None:
        """Tell every other enrolled online user that ``user_id`` completed enrollment."""
        self._broadcast(Joined(user_id), exclude=user_id)

    def shutdown(self) -> None:
        """Close every live session with SHUTTING_DOWN (messages in flight get stored)."""
        for state in list(self._online.values()):
            state.peer.close(ErrorCode.SHUTTING_DOWN, "the server is stopping")

    # -- connection lifecycle (called by the protocol adapter) --------------------

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1

    def connection_refused(self, why: str) -> None:
        """Count a connection refused when it was made: ``why`` is ``"busy"``
        (the server is full), ``"backoff"`` (its address failed too many
        handshakes) or ``"share"`` (its address has its share of handshakes)."""
        self.refused[why] += 1

    def login(self, peer: Peer, record: UserRecord) -> None:
        """A session authenticated as ``record``; a previous one is REPLACED.
        One whose user was revoked since its record was read is closed REVOKED."""
        uid = record.user_id
        if uid in self._revoked:
            self.log.info("user {user_id} was revoked while logging in", user_id=uid)
            peer.close(ErrorCode.REVOKED, "the admin revoked this account")
            return
        rotated = self._rotated.get(uid)
        if rotated is not None and record.keys != rotated:
            self.log.info("user {user_id} logged in with keys replaced meanwhile", user_id=uid)
            peer.close(ErrorCode.AUTH_FAILED, STALE_KEYS)
            return
        # A ROTATE stored since the record was read (to these keys, as just
        # checked) ended the enrollment the record may still show.
        enrolling = record.enrolling and rotated is None
        state = _Online(
            peer,
            enrolling,
            record.enrollment_expires_ms if enrolling else None,
            TokenBucket(self.message_rate, max(self.message_rate, 1), self.clock.seconds()),
            keys=record.keys,
        )
        old = self._online.get(uid)
        self._online[uid] = state
        self._by_peer[id(peer)] = state
        if old is not None:
            self._by_peer.pop(id(old.peer), None)
            self._detach(old)
            old.peer.close(ErrorCode.REPLACED, "a newer session of this user took over")
        self.log.info("user {user_id} logged in", user_id=uid, enrolling=enrolling)
        if not state.enrolling:
            self._start(state, uid)

    def logout(self, peer: Peer) -> None:
        """The session's connection is gone: store what was in flight to it."""
        state = self._by_peer.pop(id(peer), None)
        if state is None:
            return
        if self._online.get(peer.user_id) is state:
            del self._online[peer.user_id]
        self._detach(state)

    def _detach(self, state: _Online) -> None:
        state.closed = True
        items = [i for items in state.inflight.values() for i in items] + state.backlog
        state.inflight, state.backlog = {}, []
        for item in items:
            if item.file_id is None:
                self._store(item, state.peer.user_id)

    def _abandon(self, state: _Online, reason: str) -> None:
        """A revoked recipient: its in-flight messages go nowhere; senders hear why."""
        self._by_peer.pop(id(state.peer), None)
        state.closed = True
        items = [i for items in state.inflight.values() for i in items] + state.backlog
        state.inflight, state.backlog = {}, []
        told: set[tuple[int, bytes]] = set()
        for item in items:
            if item.file_id is None and (item.sender, item.msg_id) not in told:
                told.add((item.sender, item.msg_id))  # a resend waiting too: one ERROR
                self._notify(item.sender, _error(ErrorCode.UNKNOWN_RECIPIENT, reason, item.msg_id))

    async def _directory_users(self) -> list[int]:
        """Every enrolled user: one still enrolling (a token not yet used) is
        not listed; others learn of it by JOINED once it has rotated."""
        users = await self.storage.list_users()
        enrolling = await self.storage.enrollments()
        return [u for u in users if u not in enrolling] if enrolling else users

    def _send_directory(self, state: _Online, users: Iterable[int]) -> None:
        """DIRECTORY, in as many parts as the frame limit needs."""
        for part in split_directory(tuple(users), max_inner_size(self.max_frame)):
            state.peer.send(part)

    def _start(self, state: _Online, uid: int) -> None:
        """Directory first, then kept notices, then pending messages in arrival
        order, then live ones."""

        async def start() -> None:
            users = await self._directory_users()
            if state.closed:
                return
            self._send_directory(state, users)
            await self._send_notices(state, uid)
            if state.closed:
                return
            # Messages for this user still being written (it was offline, or
            # its previous session's were in flight) come before live ones.
            await self._stores_settled(uid)
            if state.closed:
                return
            pending = await self.storage.pending_for(uid)
            if state.closed:
                return
            state.ready = True
            self._offer_stored(state, pending)
            backlog, state.backlog = state.backlog, []
            if any(i.file_id is not None and i.file_id not in state.sent_files for i in backlog):
                # Stored after the read above: storage holds the order now.
                state.spilled = True
            for item in backlog:
                self._offer(state, item)
            self._maybe_refill(state)

        def failed(failure: Failure) -> None:
            self.log.failure("could not start the session of {user_id}", failure, user_id=uid)
            if not state.closed:
                state.peer.close(ErrorCode.STORAGE_FAILED, "the server could not read its storage")

        ensureDeferred(start()).addErrback(failed)

    async def _send_notices(self, state: _Online, uid: int) -> None:
        """Send the notices kept while ``uid`` was offline, then a PING whose
        PONG deletes them (see ``_ask_receipt``).

        A storage failure is logged and the session goes on; the notices stay
        for the next login.
        """
        state.notices_asked = True
        try:
            notices = await self.storage.notices_for(uid)
        except StorageError as error:
            self.log.warn(
                "could not read the notices of {user_id}: {error}", user_id=uid, error=str(error)
            )
            return
        if state.closed or not notices:
            return
        done: list[int] = []
        for notice_id, data in notices:
            try:
                messages = decode_all(data)
            except InnerError:  # authenticated by storage: only a bug writes this
                self.log.error("dropping notice {notice_id}: not an inner message",
                               notice_id=notice_id)  # fmt: skip
                messages = []
            for message in messages:
                state.peer.send(message)
            done.append(notice_id)
        self.log.info("sent {count} notices to {user_id}", count=len(done), user_id=uid)
        self._ask_receipt(state, done)

    def _ask_receipt(self, state: _Online, notice_ids: list[int]) -> None:
        """PING after sent notices: the client answers PINGs in order, so its
        PONG shows it has read them, and only then are they deleted.  A session
        that ends first leaves them for the next login (a repeat, not a loss)."""
        nonce = secrets.randbits(64)
        state.notice_pings[nonce] = notice_ids
        state.peer.send(Ping(nonce))

    def _remove_notices(self, uid: int, ids: list[int]) -> None:
        def failed(failure: Failure) -> None:
            # They stay and are sent again at the next login: a repeat, not a loss.
            if failure.check(StorageError):
                self.log.warn("sent notices kept (they will be sent again): {error}",
                              error=str(failure.value))  # fmt: skip
            else:
                self.log.failure("could not delete sent notices", failure)

        self.storage.remove_notices(uid, ids).addErrback(failed)

    def _notify(self, user_id: int, message: InnerMessage) -> None:
        """Send to ``user_id``'s live session, or keep it as a notice for its next login."""
        state = self._online.get(user_id)
        if state is not None and not state.closed:
            state.peer.send(message)
            return

        def kept(notice_id: int) -> None:
            self.notices_kept += 1
            now = self._online.get(user_id)
            if now is not None and not now.closed and now.notices_asked:
                # The user came back while the notice was written, after the
                # login read: send it now.
                now.peer.send(message)
                self._ask_receipt(now, [notice_id])

        def failed(failure: Failure) -> None:
            if failure.check(UnknownUser):
                return  # the sender was revoked meanwhile
            if failure.check(StorageError):
                self.log.warn("could not keep a notice for {user_id}: {error}",
                              user_id=user_id, error=str(failure.value))  # fmt: skip
            else:
                self.log.failure("could not keep a notice for {user_id}", failure,
                                 user_id=user_id)  # fmt: skip

        self.storage.store_notice(user_id, encode(message)).addCallbacks(kept, failed)

    # -- inner messages ---------------------------------------------------------

    def messages_received(self, peer: Peer, messages: list[ServerInbound]) -> None:
        """The inner messages of one sealed frame from ``peer``'s live session,
        in order, as :func:`~enclaves.inner.decode_routed` gives them."""
        state = self._by_peer.get(id(peer))
        if state is None:
            return
        now = self.clock.seconds()
        online = self._online
        storing = self._storing_messages  # the messages whose stores are in flight
        message: Any  # a SEND's tuple and RECEIVED's bytes are told apart by type
        for message in messages:
            if state.closed:
                return  # an earlier message ended the session
            # The two kinds of nearly all traffic first: a SEND to a recipient
            # whose DELIVERs go straight out, and the RECEIVED of a live one.
            # Each test below is one that _route/_offer/_deliver and
            # _acknowledge make on their way to the same outcome; anything
            # else takes the long way.
            cls = type(message)
            if state.enrolling:
                self._other_message(state, routed_message(message))
            elif cls is tuple:  # SEND: (msg_id, recipient, blob)
                if not state.bucket.take(now):
                    peer.close(
                        ErrorCode.MESSAGE_RATE, f"more than {self.message_rate} messages a second"
                    )
                    return
                msg_id, recipient, blob = message
                target = online.get(recipient)
                if (
                    target is None
                    or target.closed
                    or target.enrolling
                    or not target.ready
                    or target.spilled
                    or target.refilling
                    or self._storing.get(recipient)
                    or (storing and (recipient, peer.user_id, msg_id) in storing)
                    or msg_id in target.inflight
                    or len(target.inflight) >= self.max_inflight
                    or len(blob) > self.max_blob
                ):
                    self._route(state, routed_send(message))
                    continue
                self.messages_routed += 1
                target.inflight[msg_id] = [_Item(peer.user_id, msg_id, blob)]
                target.peer.send_encoded(encoded_deliver(msg_id, peer.user_id, blob))
            elif cls is bytes:  # RECEIVED: its msg_id
                msg_id = message
                items = state.inflight.get(msg_id)
                if (
                    items is None
                    or len(items) != 1
                    or items[0].file_id is not None
                    or state.spilled
                    or (storing and (peer.user_id, items[0].sender, msg_id) in storing)
                ):
                    self._acknowledge(state, msg_id)
                    continue
                del state.inflight[msg_id]
                self.messages_delivered += 1
                sender = online.get(items[0].sender)
                if sender is not None and not sender.closed:
                    sender.peer.send_encoded(encoded_accepted_delivered(msg_id))
                else:
                    self._delivered_live(items[0].sender, msg_id)
            else:
                self._other_message(state, message)

    def _other_message(self, state: _Online, message: InnerMessage) -> None:
        peer = state.peer
        if isinstance(message, Error):
            self.log.info(
                "user {user_id} reported error {code}", user_id=peer.user_id, code=message.code
            )
            return
        if isinstance(message, Ping):
            peer.send(Pong(message.nonce))
            return
        if isinstance(message, Pong):
            notice_ids = state.notice_pings.pop(message.nonce, None)
            if notice_ids:
                self._remove_notices(peer.user_id, notice_ids)
            return
        if isinstance(message, Send | Rotate | Invite) and not state.bucket.take(
            self.clock.seconds()
        ):
            peer.close(ErrorCode.MESSAGE_RATE, f"more than {self.message_rate} messages a second")
            return
        if state.enrolling and not isinstance(message, Rotate):
            msg_id = getattr(message, "msg_id", NO_MSG_ID)
            peer.send(
                _error(ErrorCode.ENROLLMENT_REQUIRED, "ROTATE your enrollment keys first", msg_id)
            )
            return
        if isinstance(message, Send):
            self._route(state, message)
        elif isinstance(message, Received):
            self._acknowledge(state, message.msg_id)
        elif isinstance(message, Rotate):
            self._rotate(state, message)
        elif isinstance(message, Invite):
            self._invite(state)
        else:
            peer.close(ErrorCode.BAD_MESSAGE, f"a client may not send {kind_name(message)}")

    def _route(self, state: _Online, send: Send) -> None:
        sender = state.peer.user_id
        if len(send.blob) > self.max_blob:
            self._too_large(sender, send)
            return
        if send.recipient == 0:
            state.peer.send(_error(ErrorCode.UNKNOWN_RECIPIENT, "no such user", send.msg_id))
            return
        self.messages_routed += 1
        item = _Item(sender, send.msg_id, send.blob)
        target = self._online.get(send.recipient)
        if target is None or target.closed or target.enrolling:
            self._store(item, send.recipient)
        else:
            self._offer(target, item)

    def _too_large(self, sender: int, send: Send) -> None:
        """MESSAGE_TOO_LARGE for ``send``, unless it is the resend of a copy
        this server holds, stored while its --max-frame was larger: that copy
        answers it (ACCEPTED), as for any resend."""
        recipient, msg_id = send.recipient, send.msg_id
        refusal = _error(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"this server takes messages of at most {self.max_blob} bytes, encrypted",
            msg_id,
        )
        target = self._online.get(recipient)
        item = _Item(sender, msg_id, send.blob)
        if (recipient, sender, msg_id) in self._storing_messages or (
            target is not None and not target.closed and self._is_resend(target, item)
        ):
            return  # the copy's store, or its RECEIVED, answers it
        if recipient == 0:
            self._tell(sender, refusal)
            return

        def looked_up(file_id: int | None) -> None:
            self._tell(sender, Accepted(msg_id) if file_id is not None else refusal)

        def failed(failure: Failure) -> None:
            # The copy's own store failed: its ERROR went to the sender.
            self.log.info(
                "a resend from {sender}: its copy's store failed ({why})",
                sender=sender,
                why=failure.getErrorMessage(),
            )

        self.storage.held_message(recipient, sender, msg_id).addCallbacks(looked_up, failed)

    def _offer(self, state: _Online, item: _Item) -> None:
        """Deliver now if the window allows, else leave the message to storage."""
        if (
            item.file_id is None
            and (self._storing_messages or item.msg_id in state.inflight)
            and self._is_resend(state, item)
        ):
            return
        if not state.ready:
            state.backlog.append(item)
        elif item.file_id is None and self._storing.get(state.peer.user_id):
            # Older messages for this recipient are still being stored: this
            # one goes behind them, and a refill delivers all in order.
            self._spill(state)
            self._store(item, state.peer.user_id)
        elif self._twin_out(state, item) or (
            not state.spilled
            and not state.refilling
            and len(state.inflight) < self.max_inflight
            and item.msg_id not in state.inflight
        ):
            self._deliver(state, item)
        elif item.file_id is None:
            self._spill(state)
            self._store(item, state.peer.user_id)
        else:  # already stored: a refill will pick it up
            self._spill(state)
            state.missed = state.missed or state.refilling
            if item.msg_id in state.inflight:  # another sender's, not a copy
                state.collision = item.msg_id  # refill once that one is acknowledged

    @staticmethod
    def _twin_out(state: _Online, item: _Item) -> bool:
        """Is a copy of ``item`` from its own sender out to ``state``?  Then
        one RECEIVED settles both.  Another sender's message under the same
        msg_id (the ids are the senders' own) is not a copy: RECEIVED names
        only the msg_id, so ``item`` waits in storage until that one is
        acknowledged, and what follows it waits behind it."""
        return any(out.sender == item.sender for out in state.inflight.get(item.msg_id, ()))

    def _spill(self, state: _Online) -> None:
        """New messages for ``state`` wait in storage from now on.  At the start
        of a spill the live messages out to it are stored first, in the order
        they went out, so that if its connection drops they stay ahead of the
        ones that wait: its next login gets all in order.  Their senders get
        ACCEPTED when they are stored, DELIVERED on RECEIVED as ever."""
        if state.spilled:
            return
        state.spilled = True
        uid = state.peer.user_id
        for items in list(state.inflight.values()):
            for item in items:
                if item.file_id is None:
                    self._store(item, uid)

    def _is_resend(self, state: _Online, item: _Item) -> bool:
        """Is the live ``item`` a resend of a message from its sender that is
        being stored for this recipient, or is already out to it?  Then it is
        not sent or stored again: the copy answers it.  A store's ACCEPTED or
        ERROR goes to the sender's session of that moment; a stored copy out
        to the recipient is on disk, so the resend is ACCEPTED now (DELIVERED
        follows the RECEIVED); for a live one the RECEIVED, or the store if
        the session ends first, answers both."""
        if (
            self._storing_messages
            and (state.peer.user_id, item.sender, item.msg_id) in self._storing_messages
        ):
            return True
        for twin in state.inflight.get(item.msg_id, ()):
            if twin.sender == item.sender:
                if twin.file_id is not None:
                    self._tell(item.sender, Accepted(item.msg_id))
                return True
        return False

    def _refill(self, state: _Online) -> None:
        """Deliver spilled messages from storage, in order, as the window drains."""
        state.refilling = True
        uid = state.peer.user_id

        def loaded(pending: list[Any]) -> None:
            state.refilling = False
            if state.closed:
                return
            state.spilled, state.missed = state.missed, False
            state.collision = None
            self._offer_stored(state, pending)
            self._maybe_refill(state)

        def failed(failure: Failure) -> None:
            state.refilling = False
            self.log.failure("could not read pending messages of {user_id}", failure, user_id=uid)

        self.storage.pending_for(uid).addCallbacks(loaded, failed)

    def _offer_stored(self, state: _Online, pending: list[Any]) -> None:
        """Offer what a read of storage listed, in order, but for copies sent
        to this session already or whose removal is being written (listed
        until it is: ``IStorage.pending_for``)."""
        for stored in pending:
            if stored.file_id not in state.sent_files and stored.file_id not in self._removing:
                self._offer(state, _Item(stored.sender, stored.msg_id, stored.blob, stored.file_id))

    def _stores_settled(self, user_id: int) -> Deferred[None]:
        """Fires once no store for ``user_id`` is in flight."""
        if not self._storing.get(user_id):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._settle_waiters.setdefault(user_id, []).append(waiter)
        return waiter

    def _wake(self, user_id: int) -> None:
        """Fire the waiters of :meth:`_stores_settled` once nothing is in flight."""
        if not self._storing.get(user_id):
            for waiter in self._settle_waiters.pop(user_id, []):
                waiter.callback(None)

    def _maybe_refill(self, state: _Online) -> None:
        if (
            state.spilled
            and state.ready
            and not state.refilling
            and not state.closed
            and len(state.inflight) <= self.max_inflight // 2
            and (state.collision is None or state.collision not in state.inflight)
        ):
            self._refill(state)

    def _deliver(self, state: _Online, item: _Item) -> None:
        if item.file_id is not None:
            if item.file_id in state.sent_files:
                return
            state.sent_files.add(item.file_id)
            if len(item.blob) > _MAX_DELIVERABLE:
                self._drop_undeliverable(state.peer.user_id, item)
                return
        waiting = state.inflight.get(item.msg_id)
        if waiting is not None:  # its own copy is out (_twin_out): one ack settles both
            waiting.append(item)
            return
        state.inflight[item.msg_id] = [item]
        state.peer.send_encoded(encoded_deliver(item.msg_id, item.sender, item.blob))

    def _drop_undeliverable(self, recipient: int, item: _Item) -> None:
        """A stored message no frame can carry: only a server once run with a
        --max-frame above the protocol's limit took these, and sending its
        DELIVER would end the session at every login.  It is deleted, and its
        sender, told ACCEPTED then, now gets MESSAGE_TOO_LARGE for it."""
        self.log.error(
            "stored message {file_id} for {user_id} is {size} bytes, more than one "
            "frame can carry ({limit}): deleted unread, its sender told",
            file_id=item.file_id,
            user_id=recipient,
            size=len(item.blob),
            limit=_MAX_DELIVERABLE,
        )

        def removed(_: None) -> None:
            self._notify(
                item.sender, _error(ErrorCode.MESSAGE_TOO_LARGE, UNDELIVERABLE, item.msg_id)
            )

        def failed(failure: Failure) -> None:  # kept; the next login tries again
            self.log.error(
                "could not delete undeliverable message {file_id}: {error}",
                file_id=item.file_id,
                error=failure.getErrorMessage(),
            )

        assert item.file_id is not None  # called for stored messages only
        self._remove_file(item.file_id).addCallbacks(removed, failed)

    def _store(self, item: _Item, recipient: int) -> None:
        message = (recipient, item.sender, item.msg_id)
        if message in self._storing_messages:
            # A resend (after the sender reconnected) of a message still being
            # written: that store's ACCEPTED or ERROR, sent to the sender's
            # session then, answers this one too.  Nothing is stored twice.
            return
        self._storing_messages.add(message)
        self._storing[recipient] = self._storing.get(recipient, 0) + 1

        def settled() -> _Online | None:
            """One store fewer in flight; the recipient's live state, if any."""
            self._storing_messages.discard(message)
            left = self._storing.pop(recipient) - 1
            if left:
                self._storing[recipient] = left
            target = self._online.get(recipient)
            if target is None or target.closed or target.enrolling:
                return None
            return target

        def stored(file_id: int) -> None:
            self.messages_stored += 1
            item.file_id = file_id
            if item.acked:  # its RECEIVED came first: ACCEPTED and DELIVERED went then
                settled()
                # Listed by pending_for until its removal is written, which
                # _remove_file keeps a refill from sending again.
                self._remove_file(file_id).addErrback(self._removal_failed).addErrback(
                    lambda _: None
                )
                self._wake(recipient)
                return
            self._tell(item.sender, Accepted(item.msg_id))
            target = settled()
            if target is not None:
                if any(out is item for out in target.inflight.get(item.msg_id, ())):
                    # Stored while out to this session (a spill began): its
                    # RECEIVED deletes the copy; a refill must not resend it.
                    target.sent_files.add(file_id)
                elif target.ready and self._storing.get(recipient):
                    target.spilled = True  # the last store to finish refills, in order
                else:
                    self._offer(target, item)
                    self._maybe_refill(target)
            self._wake(recipient)

        def refused(failure: Failure) -> None:
            target = settled()
            if target is not None and target.ready:
                self._maybe_refill(target)
            if failure.check(UnknownUser):
                code, text = ErrorCode.UNKNOWN_RECIPIENT, "no such user"
            elif failure.check(QuotaExceeded):
                code, text = ErrorCode.QUOTA_EXCEEDED, "the recipient's queue is full"
            else:
                if not failure.check(StorageError):
                    self.log.failure("storing a message failed", failure)
                code, text = ErrorCode.STORAGE_FAILED, "the server could not store the message"
            self.log.info(
                "message for {recipient} not stored: {code}", recipient=recipient, code=code.name
            )
            if item.acked or (
                target is not None
                and any(out is item for out in target.inflight.get(item.msg_id, ()))
            ):
                # A spill's copy of a message out live, or already answered:
                # that delivery stands (a dropped connection stores it again).
                self._wake(recipient)
                return
            self._notify(item.sender, _error(code, text, item.msg_id))
            self._wake(recipient)

        self.storage.store_message(recipient, item.sender, item.msg_id, item.blob).addCallbacks(
            stored, refused
        )

    def _acknowledge(self, state: _Online, msg_id: bytes) -> None:
        items = state.inflight.pop(msg_id, None)
        if not items:
            return  # a duplicate or stray RECEIVED is harmless
        if self._storing_messages:  # stored since it went out (a spill began)?
            uid = state.peer.user_id
            for item in items:
                if item.file_id is None and (uid, item.sender, msg_id) in self._storing_messages:
                    item.acked = True  # answered now as live; the copy goes once written
        if len(items) > 1:
            self._acknowledge_copies(msg_id, items)
        else:
            (item,) = items
            self.messages_delivered += 1
            if item.file_id is None:
                self._delivered_live(item.sender, msg_id)
            else:
                self._remove_stored(item.sender, msg_id, [item.file_id])
        self._maybe_refill(state)

    def _acknowledge_copies(self, msg_id: bytes, items: list[_Item]) -> None:
        """One RECEIVED for a message out more than once: a resend's copies,
        all from its one sender (only such copies share a msg_id in flight:
        :meth:`_twin_out`), are settled together."""
        sender_id = items[0].sender
        self.messages_delivered += 1
        stored = [i.file_id for i in items if i.file_id is not None]
        if not stored:
            self._delivered_live(sender_id, msg_id)
            return
        if len(stored) < len(items):  # a live resend too: it is acknowledged
            self._tell(sender_id, checked_accepted(msg_id))
        self._remove_stored(sender_id, msg_id, stored)

    def _delivered_live(self, sender_id: int, msg_id: bytes) -> None:
        """A message delivered without being stored: ACCEPTED and DELIVERED."""
        sender = self._online.get(sender_id)
        if sender is not None and not sender.closed:
            # msg_id came from a decoded RECEIVED: 16 bytes.
            sender.peer.send_encoded(encoded_accepted_delivered(msg_id))
        else:  # no ACCEPTED (the outbox resends); DELIVERED kept as a notice
            self._notify(sender_id, Delivered(msg_id))

    def _removal_failed(self, failure: Failure) -> Failure:
        """A delivered message's copy could not be deleted: it stays and is
        delivered again; the recipient drops the duplicate, and its RECEIVED
        then brings the DELIVERED.  A refusing disk is a condition storage
        already logged, not a bug."""
        if failure.check(StorageError):
            self.log.warn(
                "delivered message kept (it will be delivered again): {error}",
                error=str(failure.value),
            )
        else:
            self.log.failure("could not delete a delivered message", failure)
        return failure

    def _remove_file(self, file_id: int) -> Deferred[None]:
        """``storage.remove_message``, with ``file_id`` in ``_removing`` until
        it answers.  A removal that fails leaves the copy listed again, and
        the next login or refill delivers it again."""
        self._removing.add(file_id)

        def settled(result: Any) -> Any:
            self._removing.discard(file_id)
            return result

        removal: Deferred[None] = self.storage.remove_message(file_id)
        return removal.addBoth(settled)

    def _remove_stored(self, sender: int, msg_id: bytes, file_ids: list[int]) -> None:
        """Delete the delivered stored copies (one, but for copies stored twice
        by a server before resends were recognised); DELIVERED once all are gone."""

        def removed(_: object) -> None:
            self._notify(sender, Delivered(msg_id))

        removals = [self._remove_file(n).addErrback(self._removal_failed) for n in file_ids]
        gatherResults(removals, consumeErrors=True).addCallbacks(removed, lambda _: None)

    def _rotate(self, state: _Online, rotate: Rotate) -> None:
        uid = state.peer.user_id
        if state.enrolling and state.expires_ms is not None and self._now_ms() > state.expires_ms:
            state.peer.close(ErrorCode.TOKEN_EXPIRED, "the enrollment token has expired")
            return
        keys = KeyPair(rotate.enc, rotate.auth)

        def rotated(_: None) -> None:
            was_enrolling = state.enrolling
            state.enrolling = False
            state.expires_ms = None
            self._rotated[uid] = keys
            # Current now: the login's keys and earlier requests are past.
            state.keys = keys
            if keys in state.rotating:
                state.rotating = state.rotating[state.rotating.index(keys) + 1 :]
            self.log.info("user {user_id} rotated its keys", user_id=uid)
            live = self._online.get(uid)
            if live is not None and live is not state and not live.closed:
                if live.keys != keys and keys not in live.rotating:
                    # It logged in with the old keys while this ROTATE was stored.
                    live.peer.close(ErrorCode.AUTH_FAILED, STALE_KEYS)
                elif live.enrolling and live.keys == keys:
                    # It logged in with these keys while they were stored (the
                    # record it read still said enrolling): enrolled now.
                    live.enrolling, live.expires_ms = False, None
                    self._start(live, uid)
            if state.closed:
                if was_enrolling:
                    self.notify_joined(uid)
                return
            state.peer.send(Rotated())
            if was_enrolling:
                self._start(state, uid)
                self.notify_joined(uid)
            else:
                ensureDeferred(self._directory_users()).addCallback(
                    lambda users: None if state.closed else self._send_directory(state, users)
                ).addErrback(lambda f: self.log.failure("directory after rotation", f))

        def failed(failure: Failure) -> None:
            if keys in state.rotating:  # not stored: it cannot be current
                at = state.rotating.index(keys)
                state.rotating = state.rotating[:at] + state.rotating[at + 1 :]
            if failure.check(KeysReplaced):
                # Another session's ROTATE was stored first: these keys are dead.
                self.log.info("user {user_id}: ROTATE from replaced keys refused", user_id=uid)
                if not state.closed:
                    state.peer.close(ErrorCode.AUTH_FAILED, STALE_KEYS)
                return
            if not failure.check(StorageError):
                self.log.failure("rotation of {user_id} failed", failure, user_id=uid)
            if not state.closed:
                state.peer.send(
                    _error(ErrorCode.STORAGE_FAILED, "the new keys could not be stored")
                )

        # Its own earlier ROTATEs may be stored first (two /rotate in a row,
        # or one resent): any of their keys, or the login's, may be current.
        replacing = frozenset((state.keys, *state.rotating)) if state.keys is not None else None
        state.rotating = (*state.rotating, keys)
        self.storage.replace_user_keys(uid, keys, replacing).addCallbacks(rotated, failed)

    def _invite(self, state: _Online) -> None:
        if not self.allow_invites:
            state.peer.send(_error(ErrorCode.INVITES_DISABLED, "this server does not allow INVITE"))
            return
        inviter, now = state.peer.user_id, self.clock.seconds()
        bucket = self._invite_buckets.get(inviter)
        if bucket is None:
            rate = self.invites_per_hour / 3600
            bucket = self._invite_buckets[inviter] = TokenBucket(rate, self.invites_per_hour, now)
        if not bucket.take(now):
            self.log.info("user {inviter}: INVITE rate exceeded", inviter=inviter)
            state.peer.send(
                _error(
                    ErrorCode.RATE_LIMITED,
                    f"at most {self.invites_per_hour} invitations an hour; try later",
                )
            )
            return
        self._inviting += 1
        self.storage.enrollments().addCallback(self._invite_checked, state).addErrback(
            self._invite_failed, state
        )

    def _invite_failed(self, failure: Failure, state: _Online) -> None:
        self._inviting -= 1
        self.log.failure("INVITE failed", failure)
        if not state.closed:
            state.peer.send(_error(ErrorCode.STORAGE_FAILED, "could not create the invitation"))

    def _invite_checked(self, table: dict[int, int], state: _Online) -> None:
        now_ms = self._now_ms()
        outstanding = sum(1 for expires in table.values() if expires >= now_ms)
        if outstanding + self._inviting > self.max_enrollments:
            self._inviting -= 1
            self.log.warn(
                "INVITE refused: {count} enrollments outstanding (limit {limit})",
                count=outstanding,
                limit=self.max_enrollments,
            )
            if not state.closed:
                state.peer.send(
                    _error(ErrorCode.RATE_LIMITED, "too many invitations outstanding; try later")
                )
            return

        def created(result: tuple[Any, int]) -> None:
            self._inviting -= 1
            token, expires_ms = result
            self.log.info(
                "user {inviter} invited user {user_id}",
                inviter=state.peer.user_id,
                user_id=token.user_id,
            )
            if not state.closed:
                state.peer.send(InviteToken(token.user_id, expires_ms, str(token)))

        create_enrollment(self.storage, now_ms, self.token_lifetime).addCallbacks(
            created, self._invite_failed, errbackArgs=(state,)
        )

    def purge_expired_enrollments(
        self, after: float = ENROLLMENT_PURGE_AFTER
    ) -> Deferred[list[int]]:
        """Revoke every user whose enrollment token expired more than ``after``
        seconds ago without being used; fires with their ids (each logged)."""

        async def purge() -> list[int]:
            table = await self.storage.enrollments()
            cutoff = self._now_ms() - int(after * 1000)
            doomed = sorted(uid for uid, expires in table.items() if expires < cutoff)
            for uid in doomed:
                try:
                    await self.revoke(uid)
                except StorageError as error:
                    self.log.warn("could not purge enrollment {user_id}: {error}", user_id=uid,
                                  error=str(error))  # fmt: skip
                    continue
                self.log.info("purged user {user_id}: enrollment token unused and expired",
                              user_id=uid)  # fmt: skip
            return doomed

        return ensureDeferred(purge())

    # -- helpers --------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _tell(self, user_id: int, message: InnerMessage) -> None:
        """Send to ``user_id``'s live session if there is one (else it resends later)."""
        state = self._online.get(user_id)
        if state is not None and not state.closed:
            state.peer.send(message)

    def _broadcast(self, message: InnerMessage, exclude: int) -> None:
        for uid, state in self._online.items():
            if uid != exclude and not state.closed and not state.enrolling:
                state.peer.send(message)
