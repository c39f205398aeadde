"""The client's glue: :class:`ClientCore` + keystore + one connection at a time.

:class:`ClientApp` logs in (trying keys of an unconfirmed ROTATE first),
rotates the token's keys on the first session, feeds the core every inner
message, saves the keystore before anything leaves the machine (a DELIVER is
acknowledged with RECEIVED only after the save), resends the outbox after a
reconnect at a paced rate, reconnects with exponential backoff and jitter,
and stops for good on refusals that retrying can not fix.  Everything the
user should see goes to ``out(tag, text)``; the tags are listed in
docs/client.rst ("Output lines").
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from attrs import evolve
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from enclaves.atomic import NotSynced
from enclaves.client.connection import (
    ClientConnection,
    LoginFailed,
    NotAnEnclavesServer,
    connect,
)
from enclaves.client.contacts import ContactError
from enclaves.client.core import (
    MAX_TEXT,
    BlobDropped,
    BlobFromRemoved,
    BlobHeld,
    ClientCore,
    Event,
    IdentityKeyChanged,
    KexCompleted,
    KexFailed,
    KexRetried,
    KexStuck,
    MessageReceived,
    Refused,
    SendBlob,
)
from enclaves.client.endpoint import EndpointError, client_endpoint, host_port, is_tls, shown
from enclaves.client.keystore import Keystore
from enclaves.client.state import ClientState
from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode
from enclaves.inner import (
    Accepted,
    Deliver,
    Delivered,
    Directory,
    Error,
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
)
from enclaves.token import TokenError, parse_token

__all__ = [
    "Output",
    "ClientApp",
    "NotSaved",
    "short_id",
    "clock_text",
    "date_text",
    "REFUSAL_TEXT",
    "QUEUED_WHY",
]

Output = Callable[[str, str], None]

log = Logger()

# Longest wait for the burst of stored messages after a login's DIRECTORY.
LOGIN_BURST_MAX = 60.0
# Why a MESSAGE can never be opened, in words; the [warn] about it comes at
# most once per contact this often.
UNOPENED_TEXT = {
    "failed authentication": "it is not sealed under any keys this keystore has (after "
    "restoring an old backup of it, or forged)",
    "epoch keys deleted": "it is sealed under old keys this client has already deleted",
}
UNOPENED_WARN_INTERVAL = 600.0

# Why a [queued] message did not leave at once.
QUEUED_WHY = "not connected; goes when the connection is back"

# Plain words for the server's per-message refusals (MESSAGE_TOO_LARGE names
# the server's limit: see ClientApp._on_error).
REFUSAL_TEXT = {
    ErrorCode.UNKNOWN_RECIPIENT: "the server has no such user (removed?)",
    ErrorCode.QUOTA_EXCEEDED: "the recipient's mailbox on the server is full",
    ErrorCode.STORAGE_FAILED: "the server could not store it",
    ErrorCode.ENROLLMENT_REQUIRED: "enrollment is not complete yet",
}

# Why a message the server had accepted will never be delivered.
LOST_TEXT = {
    ErrorCode.UNKNOWN_RECIPIENT: "the recipient was removed from the server before reading it",
    ErrorCode.MESSAGE_TOO_LARGE: (
        "the server had stored it under a frame limit no client can receive, and deleted it"
    ),
}

# Save failures that freeing space (or raising a file size limit) cures.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# Session endings that retrying can not fix, in plain words.
FATAL_TEXT = {
    ErrorCode.REVOKED: "The admin has removed your account from this server.",
    ErrorCode.REPLACED: (
        "Another client logged in with this account (the same keystore is in use "
        "elsewhere); this one stops so the two do not fight."
    ),
    ErrorCode.TOKEN_EXPIRED: (
        "This enrollment token has expired. Ask your admin for a new one and run "
        "'enclaves enroll' again."
    ),
}


def short_id(msg_id: bytes) -> str:
    """The first 8 hex digits of a message id, as shown to the user."""
    return msg_id.hex()[:8]


class NotSaved(Exception):
    """A command's change was undone: the keystore could not be saved with it."""

    def __init__(self, not_done: str, reason: str | None) -> None:
        super().__init__(
            f"{not_done}: could not save the keystore ({reason}); nothing changed: try "
            "again once it can be saved"
        )


class _Fatal(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ClientApp:
    """One user's client: runs until :meth:`stop` or a fatal refusal.

    ``finished`` fires with ``(exit_code, text)`` when it has stopped for good.
    ``enrolled`` fires once enrollment is complete (the token's keys rotated
    and the first DIRECTORY handled); at once for an enrolled keystore.
    """

    def __init__(
        self,
        reactor: Any,
        keystore: Keystore,
        state: ClientState,
        endpoint: str,
        out: Output,
        *,
        core: ClientCore | None = None,
        send_rate: float = 20.0,
        tick_interval: float = 30.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        connect_timeout: float = 30.0,
        reconnect: bool = True,
        rng: Callable[[], float] = random.random,
        pending_keys_sent: bool = True,
    ) -> None:
        self._reactor = reactor
        # May the server know the pending keys (a ROTATE with them may have
        # reached it)?  False for a keystore just made by enroll: then a
        # refused token costs one failed login, not two.
        self._pending_keys_sent = pending_keys_sent
        self._keystore = keystore
        self.core = core if core is not None else ClientCore(state)
        self.endpoint = endpoint
        self.out = out
        self._pending_keys: KeyPair | None = state.pending_server_keys
        self._enrolled = state.enrolled
        self._send_rate = send_rate
        self._tokens = send_rate
        self._last_refill = reactor.seconds()
        self._tick_interval = tick_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._connect_timeout = connect_timeout
        self._reconnect = reconnect
        self._rng = rng
        self.conn: ClientConnection | None = None
        self._queue: deque[InnerMessage] = deque()
        self._pump_call: Any = None
        self._incoming: list[tuple[ClientConnection, InnerMessage]] = []
        self._unsaved = False  # changes in memory the keystore file lacks
        self.save_error: str | None = None  # why the last save failed; None: it worked
        # The last save failed only at its last step (the directory's fsync):
        # the file holds the state, though a crash of the machine could undo it.
        self._save_written = False
        self.save_full = False  # the last save failed for want of space (or a size limit)
        # Sends whose save failed: in memory only, so they may not leave yet
        # ("save, then send"); they go once a save succeeds, or are lost.
        self._held: dict[bytes, Send] = {}
        # Messages reported [failed] during this run (a script's exit status
        # counts those still failed at its end: a stale refusal of a message
        # accepted since does not count).
        self.failed_this_run: set[bytes] = set()
        self._drain_call: Any = None
        self._save_call: Any = None
        self._tick_call: Any = None
        self._sleep: Deferred[None] | None = None
        self._stopping = False
        self.rotate_sent = False
        self.token_refused = False
        self.outcome: tuple[int, str] | None = None
        self.finished: Deferred[tuple[int, str]] = Deferred()
        self.enrolled: Deferred[None] = Deferred()
        if self._enrolled:
            self.enrolled.callback(None)
        self.connected_once = False
        # For the end of a piped session (:meth:`settle`).
        self.directory_handled = False
        self._directory_waiters: list[Deferred[None]] = []
        self._listed: set[int] | None = None  # the user ids of the latest DIRECTORY
        self._unlisted_waiting: set[int] = set()  # left out of it; marked after the burst
        self._resend_due = False  # the outbox goes with this session's user list
        self._resend_skipped: set[int] = set()  # its recipients the list left out
        self._unopened_warned: dict[int, float] = {}  # sender -> last [warn] of an unopened one
        self.invites_waiting = 0  # INVITEs sent and not yet answered
        self.invites_failed = 0  # INVITEs the server refused or never answered
        self.last_failure: str | None = None
        self.last_heard = 0.0  # reactor time of the last message from the server

    # -- life cycle -----------------------------------------------------------

    def now(self) -> float:
        return float(self._reactor.seconds())

    def start(self) -> Deferred[tuple[int, str]]:
        ensureDeferred(self._run()).addErrback(self._crashed)
        self._tick_call = self._reactor.callLater(self._tick_interval, self._tick)
        return self.finished

    def stop(self, code: int = 0, text: str = "") -> Deferred[tuple[int, str]]:
        """Save, disconnect, and fire ``finished`` with ``(code, text)``."""
        if self._stopping:
            return self.finished
        self._stopping = True
        for call in (self._tick_call, self._pump_call, self._save_call):
            if call is not None and call.active():
                call.cancel()
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
            self._drain()
        if not self._save() and self._report_lost() and code == 0:
            code = 1  # messages lost: not a clean end (a /quit on a terminal)
        if self._sleep is not None:
            self._sleep.cancel()
        conn, self.conn = self.conn, None

        self.outcome = (code, text)

        def done(_: object) -> tuple[int, str]:
            if not self.finished.called:
                self.finished.callback((code, text))
            return (code, text)

        if conn is not None and conn.established:
            conn.disconnect().addBoth(done)
        else:
            done(None)
        return self.finished

    def _crashed(self, failure: Any) -> None:
        log.failure("client loop failed", failure)
        self.stop(1, "internal error; see the log")

    async def _run(self) -> None:
        delay = self._retry_initial
        while not self._stopping:
            try:
                conn = await self._login()
            except _Fatal as fatal:
                self.stop(1, fatal.text)
                return
            except Exception as e:
                if self._stopping:
                    return
                self.last_failure = self._failure_text(e)
                if not self._reconnect:
                    self.stop(1, f"could not connect to the server: {self.last_failure}")
                    return
                # A rate-limited address waits as long as the server says:
                # trying earlier is refused again and only adds to the wait.
                wait = max(self._jitter(delay), _advised_wait(e))
                self.out(
                    "conn",
                    f"cannot reach the server ({self.last_failure}); retrying in {wait:.1f} s",
                )
                delay = min(delay * 2, self._retry_max)
                await self._pause(wait)
                continue
            if self._stopping:
                conn.disconnect()
                return
            delay = self._retry_initial
            self._session_started(conn)
            reason = await conn.closed
            self._session_ended(conn)
            if self._stopping:
                return
            if reason.code is not None and reason.code in FATAL_TEXT:
                self.stop(1, FATAL_TEXT[ErrorCode(reason.code)])
                return
            if not self._reconnect:
                self.stop(1, f"disconnected: {reason.name} {reason.text}")
                return
            wait = self._jitter(delay)
            self.out(
                "conn", f"disconnected ({reason.name}: {reason.text}); reconnecting in {wait:.1f} s"
            )
            await self._pause(wait)

    def _failure_text(self, error: BaseException) -> str:
        """Why a login failed, with a hint when the server may want TLS."""
        text = _reason(error)
        address = host_port(self.endpoint)
        if (
            isinstance(error, LoginFailed)
            and error.code == 0
            and error.text.startswith("connection closed")
            and address is not None
            and not is_tls(self.endpoint)
        ):
            # What a TLS server does with a plain login: it closes at once.
            text += f" (if the server uses TLS, its address is tls:{address})"
        return text

    def _jitter(self, delay: float) -> float:
        return float(delay * (0.8 + 0.4 * self._rng()))

    async def _pause(self, seconds: float) -> None:
        self._sleep = deferLater(self._reactor, seconds, lambda: None)
        try:
            await self._sleep
        except CancelledError:
            pass
        finally:
            self._sleep = None

    async def _login(self) -> ClientConnection:
        try:
            endpoint = client_endpoint(self._reactor, self.endpoint)
        except EndpointError as e:
            raise _Fatal(str(e)) from None
        # The current keys first: new keys are pending while the ROTATE that
        # sends them has not been answered, and the server learned them only
        # if the answer was lost (a crash, a broken connection).  Trying them
        # first would make every enrollment a failed handshake, which the
        # server counts against this address.
        candidates: list[tuple[str, KeyPair]] = [("current", self.core.server_keys)]
        if self._pending_keys is not None and (self._pending_keys_sent or self.rotate_sent):
            candidates.append(("new", self._pending_keys))
        last: LoginFailed | None = None
        for which, keys in candidates:
            try:
                conn: ClientConnection = await connect(
                    self._reactor,
                    endpoint,
                    self.core.user_id,
                    keys,
                    on_message=self._on_message_for(None),
                    timeout=self._connect_timeout,
                    hand_over_pings=True,
                )
            except LoginFailed as e:
                last = e
                if e.code == ErrorCode.AUTH_FAILED:
                    continue
                if isinstance(e, NotAnEnclavesServer) and not self.connected_once:
                    address = host_port(self.endpoint) or shown(self.endpoint)
                    raise _Fatal(
                        f"{address} is not an Enclaves server ({e.text}): check the "
                        "address and port"
                    ) from None
                if e.code == ErrorCode.TOKEN_EXPIRED:
                    self.token_refused = True
                    raise _Fatal(FATAL_TEXT[ErrorCode.TOKEN_EXPIRED]) from None
                # Only before the first login: later, a plain answer is more
                # likely a middlebox or a maintenance page than a wrong address.
                plain = is_tls(self.endpoint) and _not_tls(e.text) and not self.connected_once
                if e.code == 0 and plain:
                    address = host_port(self.endpoint) or shown(self.endpoint)
                    raise _Fatal(
                        f"the server at {address} does not speak TLS: give its address "
                        f"as {address}, without tls: (or check the port)"
                    ) from None
                if e.code == 0 and _tls_refused(e.text):
                    raise _Fatal(
                        "the server's TLS certificate could not be verified "
                        f"({e.text}). Check the host name and --ca-file."
                    ) from None
                raise
            conn.on_message = self._on_message_for(conn)
            if which == "new":
                self._rotation_confirmed()
            return conn
        assert last is not None
        if not self._enrolled and self._pending_keys is not None:
            self.token_refused = True
            raise _Fatal(
                "The server refused this enrollment token: it was mistyped (check it "
                "character by character), already used, or it belongs to another server. "
                "Ask your admin for a new token if it was copied right."
            )
        raise _Fatal(
            "The server does not accept this keystore's keys: your account may have "
            "been removed, or the keystore belongs to another server. Ask your admin."
        )

    def _session_started(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.connected_once = True
        self._queue.clear()
        self.out("conn", f"connected as {self.core.user_id}")
        if self._pending_keys is not None:
            keys = self._pending_keys
            self._queue.append(Rotate(keys.enc, keys.auth))
            self.rotate_sent = True
        # The outbox goes once the user list is in (the server sends it
        # first): what waits for a user it no longer lists is not sent.
        self._resend_due = self._enrolled or self._pending_keys is None
        self._pump()

    def _session_ended(self, conn: ClientConnection) -> None:
        if self.conn is conn:
            self.conn = None
        if self.invites_waiting:
            self.invites_failed += self.invites_waiting
            self.invites_waiting = 0
            self.out(
                "error",
                "the connection ended before the answer to /invite: no token was shown "
                "(the admin's users() may list an unused one)",
            )

    def _resend_outbox(self, listed: set[int], only: int | None = None) -> None:
        """Queue the outbox again: not what only memory holds (a failed save:
        that goes once saved), nor what waits for a user the server's list
        leaves out (marked failed after the login burst unless a JOINED names
        them first: then ``only`` that user's go)."""
        pending = [
            p
            for p in self.core.pending_sends()
            if p.msg_id not in self._held and (only is None or p.recipient == only)
        ]
        waiting = {p.recipient for p in pending if p.recipient not in listed}
        self._resend_skipped |= waiting
        pending = [p for p in pending if p.recipient in listed]
        if pending:
            self.out("info", f"sending {len(pending)} queued item(s) from the outbox")
        for item in pending:
            self._queue.append(Send(item.msg_id, item.recipient, item.blob))
        self._pump()

    # -- saving ---------------------------------------------------------------

    def state(self) -> ClientState:
        return evolve(
            self.core.state(), pending_server_keys=self._pending_keys, enrolled=self._enrolled
        )

    def _save(self, quiet: bool = False) -> bool:
        """Write the keystore; on failure say why (unless ``quiet``: the caller
        says it) and keep what waits for a save held."""
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None
        try:
            self._keystore.save(self.state())
        except OSError as e:
            self._unsaved = True
            self.save_error = e.strerror or str(e)
            self._save_written = isinstance(e, NotSynced)
            self.save_full = e.errno in _NO_SPACE
            if not quiet:
                self.out("error", f"could not save the keystore: {self.save_error}")
            return False
        self._unsaved = False
        self._save_written = False
        if self.save_error is not None:
            self.save_error = None
            if not self._stopping:
                self.out("info", "the keystore could be saved again")
        self._release_held()
        return True

    def _release_held(self) -> None:
        """After a successful save: what was held for it is on disk now, so it
        may leave (or, when stopping, waits in the outbox for the next run)."""
        held, self._held = self._held, {}
        for send in held.values():
            entry = self._outbox_entry(send.msg_id)
            if entry is None or entry.status != "pending":
                continue
            what = f"id={short_id(send.msg_id)} to {self._name(send.recipient)}"
            if self._stopping:
                if entry.kind == "message":
                    self.out(
                        "error",
                        f"{what} not sent: saved only now; kept in the outbox and sent next time",
                    )
            elif self.online:
                self._enqueue(send)
                if entry.kind == "message":
                    self.out("sent", f"{what} (saved now)")
            elif entry.kind == "message":
                self.out("queued", f"{what} (saved now; {QUEUED_WHY})")

    def _hold(self, events: list[Event]) -> None:
        """A save failed: keep these sends until one succeeds; show the rest."""
        for event in events:
            if isinstance(event, SendBlob):
                self._held[event.msg_id] = Send(event.msg_id, event.recipient, event.blob)
            else:
                self._show(event)

    def _report_lost(self) -> bool:
        """The last save failed: messages only memory held are lost now (said;
        True if there were any)."""
        lost = [
            short_id(entry.msg_id)
            for entry in self.core.outbox()
            if entry.msg_id in self._held and entry.kind == "message"
        ]
        if lost and self._save_written:
            # In the file's outbox after all: the next run sends them.
            self.out(
                "warn",
                f"{len(lost)} message(s) not sent ({', '.join(lost)}): the keystore was "
                f"written but its directory could not be synced ({self.save_error}); they "
                "are in its outbox and sent next time, unless a crash of this machine "
                "undoes that write",
            )
            return False
        if lost:
            self.out(
                "error",
                f"{len(lost)} message(s) lost ({', '.join(lost)}): the keystore could not be "
                f"saved ({self.save_error}), so they were never sent; send them again once "
                "it can be",
            )
        return bool(lost)

    def unsaved_count(self) -> int:
        """Messages held for a save that failed (in memory only, never sent)."""
        return sum(1 for e in self.core.outbox() if e.msg_id in self._held and e.kind == "message")

    def is_held(self, msg_id: bytes) -> bool:
        """Is this message in memory only, waiting for a save before it may leave?"""
        return msg_id in self._held

    @property
    def online(self) -> bool:
        """Does what is sent now leave at once (connected, login complete)?"""
        return self.conn is not None and (self._enrolled or self._pending_keys is None)

    def _save_soon(self) -> None:
        self._unsaved = True
        if self._save_call is None or not self._save_call.active():
            self._save_call = self._reactor.callLater(0.2, self._save)

    # -- sending --------------------------------------------------------------

    def _enqueue(self, message: InnerMessage) -> None:
        self._queue.append(message)
        self._pump()

    def _pump(self) -> None:
        if self._pump_call is not None and self._pump_call.active():
            return
        self._pump_call = None
        conn = self.conn
        if conn is None or not conn.established:
            return
        now = self.now()
        self._tokens = min(
            self._send_rate, self._tokens + (now - self._last_refill) * self._send_rate
        )
        self._last_refill = now
        while self._queue and self._tokens >= 1:
            message = self._queue.popleft()
            if isinstance(message, Send) and len(message.blob) > conn.max_blob:
                # Beyond what one frame of the protocol carries: no server takes it.
                why = f"too large to send ({len(message.blob)} bytes; at most {conn.max_blob})"
                self.core.on_refused(message.msg_id, why)
                self.failed_this_run.add(message.msg_id)
                self.out("failed", f"id={short_id(message.msg_id)}: {why}")
                continue
            conn.send(message)
            self._tokens -= 1
        if self._queue:
            wait = (1 - self._tokens) / self._send_rate
            self._pump_call = self._reactor.callLater(max(wait, 0.001), self._pump)

    def _send_events(self, events: list[Event]) -> None:
        """Show events; queue every SendBlob (the state is already saved)."""
        for event in events:
            if isinstance(event, SendBlob):
                if self.conn is not None and (self._enrolled or self._pending_keys is None):
                    self._enqueue(Send(event.msg_id, event.recipient, event.blob))
            else:
                self._show(event)

    def _apply(self, events: list[Event], quiet: bool = False) -> bool:
        """Save, then send and show: nothing leaves before it is on disk.  If
        the save fails, the sends are held until one succeeds (False)."""
        if any(isinstance(e, SendBlob) for e in events):
            if not self._save(quiet):
                self._hold(events)
                return False
        else:
            self._save_soon()
        self._send_events(events)
        return True

    # -- incoming -------------------------------------------------------------

    def _on_message_for(self, conn: ClientConnection | None) -> Callable[[InnerMessage], None]:
        def on_message(message: InnerMessage) -> None:
            self.last_heard = self.now()
            self._incoming.append((conn or self.conn, message))  # type: ignore[arg-type]
            if self._drain_call is None or not self._drain_call.active():
                self._drain_call = self._reactor.callLater(0, self._drain)

        return on_message

    def _drain(self) -> None:
        """Handle one batch; DELIVERs are acknowledged after a single save."""
        batch, self._incoming = self._incoming, []
        receipts: list[tuple[ClientConnection, bytes]] = []
        pongs: list[tuple[ClientConnection, int]] = []
        events: list[Event] = []
        now = self.now()
        for conn, message in batch:
            if conn is None:
                conn = self.conn
            if isinstance(message, Deliver):
                events += self.core.handle_blob(message.sender, message.msg_id, message.blob, now)
                receipts.append((conn, message.msg_id))
                continue
            if isinstance(message, Ping):
                pongs.append((conn, message.nonce))
                continue
            events += self._handle(message, now)
        if (receipts or any(isinstance(e, SendBlob) for e in events)) and not self._save():
            # Not acknowledged and nothing sent: the server delivers again (the
            # copy is then a duplicate, acknowledged once a save succeeds), and
            # what was to be sent leaves once a save succeeds.
            self._hold(events)
            return
        # A PONG tells the server that what came before its PING is safe here
        # (it then deletes kept receipts): save first.  Unsaved, it stays
        # unanswered, and the server keeps them and sends them again.
        if pongs and self._unsaved and not self._save():
            pongs = []
        for conn, msg_id in receipts:
            if conn is not None and conn.established:
                conn.send(Received(msg_id))
        for conn, nonce in pongs:
            if conn is not None and conn.established:
                conn.send(Pong(nonce))
        self._send_events(events)

    def _handle(self, message: InnerMessage, now: float) -> list[Event]:
        if isinstance(message, Accepted):
            entry = self._outbox_entry(message.msg_id)
            self.core.on_accepted(message.msg_id)
            if entry is not None and entry.kind == "message":
                self.out(
                    "accepted", f"id={short_id(message.msg_id)} to {self._name(entry.recipient)}"
                )
            self._save_soon()
        elif isinstance(message, Delivered):
            recipient = self.core.on_delivered(message.msg_id)
            if recipient is not None:
                self.out("delivered", f"id={short_id(message.msg_id)} to {self._name(recipient)}")
            self._save_soon()
        elif isinstance(message, Error):
            return self._on_error(message)
        elif isinstance(message, Rotated):
            self._rotation_confirmed()
        elif isinstance(message, Directory):
            events = self._on_directory(message, now)
            if not self.directory_handled:
                self.directory_handled = True
                waiting, self._directory_waiters = self._directory_waiters, []
                for waiter in waiting:
                    waiter.callback(None)
            return events
        elif isinstance(message, Joined):
            if message.user_id != self.core.user_id:
                known = {c.user_id: c for c in self.core.contacts(include_removed=True)}
                previous = known.get(message.user_id)
                if previous is not None and previous.removed:
                    self._warn_removed_again(message.user_id)
                    return []
                try:
                    self.core.add_contact(message.user_id)
                except ContactError as error:
                    self.out("warn", str(error))
                    return []
                self._save_soon()
                if self._listed is not None:
                    self._listed.add(message.user_id)  # listed now: not to be unlisted
                if previous is not None and previous.unlisted:
                    self.core.relist(message.user_id)
                    self._listed_again(message.user_id)
                if message.user_id in self._resend_skipped:
                    # Left out of the user list, named during the burst: its
                    # outbox goes after all.
                    self._resend_skipped.discard(message.user_id)
                    self._resend_outbox({message.user_id}, only=message.user_id)
                if previous is None:
                    self.out(
                        "joined",
                        f"user {message.user_id} joined; a key exchange with them runs "
                        "automatically",
                    )
        elif isinstance(message, Removed):
            self._removed(message.user_id, "was removed from the server")
        elif isinstance(message, InviteToken):
            self.invites_waiting = max(self.invites_waiting - 1, 0)
            self.out(
                "invite",
                f"token for a new user {message.user_id}, valid until "
                f"{date_text(message.expires_ms)} — give it to them privately: "
                f"{self._with_address(message.token)}",
            )
        return []

    def _with_address(self, token: str) -> str:
        """An INVITE's token with this client's server address appended
        (``@host:port`` or ``@tls:host:port``, as the admin's tokens carry it),
        so that the newcomer needs no --server.  An address the server put in
        the token itself (the reference server never does) is replaced: the
        newcomer's keystore keeps it, so a server must not be able to send the
        newcomer elsewhere under this client's name."""
        ours = shown(self.endpoint) if host_port(self.endpoint) is not None else None
        try:
            parsed = parse_token(token)
        except TokenError:
            return token  # shown as the server sent it; enroll will say what is wrong
        if parsed.address is not None and parsed.address != ours:
            self.out(
                "warn",
                f"the server's invitation token named the address {parsed.address!r}; "
                + (f"replaced by {ours}, the one this client uses" if ours else "removed"),
            )
        return str(evolve(parsed, address=ours))

    def _on_error(self, message: Error) -> list[Event]:
        try:
            code = ErrorCode(message.code)
            name = code.name
        except ValueError:
            code, name = None, f"ERROR {message.code}"
        if message.msg_id == bytes(16):
            answers_invite = code in (ErrorCode.INVITES_DISABLED, ErrorCode.RATE_LIMITED) or (
                code is ErrorCode.STORAGE_FAILED and "invitation" in message.text
            )
            if answers_invite and self.invites_waiting:
                self.invites_waiting -= 1
                self.invites_failed += 1
            if code is ErrorCode.INVITES_DISABLED:
                self.out("error", "this server does not allow invitations (ask the admin)")
            elif code is ErrorCode.STORAGE_FAILED:
                self.out("error", f"the server could not store the request: {message.text}")
            elif code is ErrorCode.RATE_LIMITED:
                self.out("error", f"the server refused the invitation: {message.text}")
            # Any other session ERROR ends the session; the reconnect loop reports it.
            return []
        entry = self._outbox_entry(message.msg_id)
        if entry is None:
            # Not in the outbox: accepted already.  The ERRORs that can follow
            # ACCEPTED are UNKNOWN_RECIPIENT (revoked before reading it) and
            # MESSAGE_TOO_LARGE (a copy stored by a server once run above the
            # protocol's frame limit, deleted unread); any other is a repeated
            # notice about an attempt since retried.
            why = LOST_TEXT.get(code) if code is not None else None
            if why is not None:
                recipient = self.core.on_lost(message.msg_id)
                if recipient is not None:
                    self._save_soon()
                    self.failed_this_run.add(message.msg_id)
                    self.out(
                        "failed",
                        f"id={short_id(message.msg_id)} message to {self._name(recipient)} "
                        f"was accepted but will never be delivered: {why}",
                    )
            return []
        if entry.kind != "message" and code is ErrorCode.UNKNOWN_RECIPIENT:
            # A key exchange with a user the server does not know (revoked):
            # moot, and nothing the user could retry.
            self.core.drop_outbox(message.msg_id)
            self._save_soon()
            log.info("key exchange blob to unknown user {peer} dropped", peer=entry.recipient)
            return []
        reason = REFUSAL_TEXT.get(code, f"{name}: {message.text}") if code else name
        if code is ErrorCode.MESSAGE_TOO_LARGE:
            # The server's limit (its --max-frame) is in its text; the same
            # blob would be refused again, so it is not offered for /retry.
            said = f": {message.text}" if message.text else ""
            reason = f"too large for this server{said} (this one is {len(entry.blob)} bytes)"
        self.core.on_refused(message.msg_id, reason)
        self._save_soon()
        what = "message" if entry.kind == "message" else "key exchange"
        self.failed_this_run.add(message.msg_id)
        if code is ErrorCode.UNKNOWN_RECIPIENT:
            again = ""  # the recipient is gone: sending again cannot help
        elif code is ErrorCode.MESSAGE_TOO_LARGE:
            again = "; send it in shorter parts" if entry.kind == "message" else ""
        else:
            again = f"; /retry {short_id(message.msg_id)} sends it again"
        self.out(
            "failed",
            f"id={short_id(message.msg_id)} {what} to {self._name(entry.recipient)} refused: "
            f"{reason}{again}",
        )
        return []

    def _on_directory(self, message: Directory, now: float) -> list[Event]:
        first = not self._enrolled
        if first and self._pending_keys is not None:
            return []  # the old session's answer: wait for ROTATED
        if self._resend_due:
            self._resend_due = False
            self._resend_skipped = set()
            self._resend_outbox(set(message.user_ids))
        if first:
            events = self.core.on_directory(message.user_ids, now, start_kex=True)
            self._enrolled = True
            others = [u for u in message.user_ids if u != self.core.user_id]
            self.out(
                "info",
                f"{len(others)} other user(s) on this server; key exchanges started with each",
            )
            # Saved, then sent; a failed save holds the offers until one
            # succeeds (or the next run sends them), and the enrollment itself
            # is done either way.
            self._apply(events)
            if not self.enrolled.called:
                self.enrolled.callback(None)
            return []
        contacts = self.core.contacts(include_removed=True)
        known = {c.user_id for c in contacts}
        removed = {c.user_id for c in contacts if c.removed}
        unlisted = {c.user_id for c in contacts if c.unlisted and not c.removed}
        self._listed = set(message.user_ids)
        missing = {c.user_id for c in contacts if not c.removed} - self._listed - unlisted
        if missing:
            # Revoked while we were offline (REMOVED goes only to those online),
            # or unreadable on the server.  Messages they sent before stay
            # stored for us and come right after this list: mark them once
            # that login burst is over.
            self._unlisted_waiting = missing
            ensureDeferred(self._unlist_after_burst())
        events = self.core.on_directory(message.user_ids, now, start_kex=False)
        for user_id in message.user_ids:
            if user_id in removed:
                self._warn_removed_again(user_id)
            elif user_id in unlisted:
                self._listed_again(user_id)
            elif user_id not in known and user_id not in (0, self.core.user_id):
                self.out(
                    "joined",
                    f"user {user_id} is new on this server; a key exchange with them runs "
                    "automatically",
                )
        self._save_soon()
        return events

    async def _unlist_after_burst(self) -> None:
        await self.quiet(LOGIN_BURST_MAX)
        self.apply_unlisted()

    def apply_unlisted(self) -> None:
        """Mark the contacts the last user list left out (once the login burst
        is over; a script calls this before its commands run)."""
        missing, self._unlisted_waiting = self._unlisted_waiting, set()
        for user_id in sorted(missing):
            still = self._listed is not None and user_id not in self._listed
            known = self.core.contacts(include_removed=True)
            if still and any(
                c.user_id == user_id and not c.removed and not c.unlisted for c in known
            ):
                failed = self.core.mark_unlisted(user_id)
                self._save_soon()
                self.out(
                    "removed",
                    f"{self._label(user_id)} is no longer on the server's user list "
                    "(removed, or the server cannot read their account): nothing is sent "
                    "to them until it lists them again",
                )
                self._report_unsent(failed, user_id, "/retry {id} once they are listed again")

    def _listed_again(self, user_id: int) -> None:
        self._save_soon()
        self.out("joined", f"{self._label(user_id)} is on the server's user list again")

    def _label(self, user_id: int) -> str:
        name = self._name(user_id)
        return name if name == str(user_id) else f"{name} ({user_id})"

    async def quiet(self, timeout: float, quiet: float = 0.5) -> None:
        """Wait, at most ``timeout`` seconds, until nothing came from the server
        for ``quiet`` seconds (polls)."""
        deadline = self.now() + timeout
        while self.now() < deadline and not self._stopping:
            if self.now() - self.last_heard >= quiet:
                return
            await deferLater(self._reactor, 0.05, lambda: None)

    def _removed(self, user_id: int, how: str) -> None:
        """A contact is gone for good: keep its tombstone (docs/client.rst)."""
        label = self._label(user_id)
        failed = self.core.remove_contact(user_id)
        self._save_soon()
        self.out("removed", f"{label} {how}")
        self._report_unsent(failed, user_id, "it will never be delivered")

    def _report_unsent(self, failed: list[bytes], user_id: int, then: str) -> None:
        """A [failed] line for each unsent message to a contact just removed or unlisted."""
        for msg_id in failed:
            self.failed_this_run.add(msg_id)
            self.out(
                "failed",
                f"id={short_id(msg_id)} message to {self._name(user_id)} not sent: the "
                f"server no longer lists them; {then.format(id=short_id(msg_id))}",
            )

    def _warn_removed_again(self, user_id: int) -> None:
        name = self._name(user_id)
        self.out(
            "warn",
            f"the server lists {name} ({user_id}) again, but that user was removed; a "
            "removed user never comes back under the same id, so this is ignored "
            "(is someone tampering with the server?)",
        )

    def _rotation_confirmed(self) -> None:
        if self._pending_keys is None:
            return
        self.core.set_server_keys(self._pending_keys)
        self._pending_keys = None
        self._save()
        self.out("info", "the server now knows only your new keys (rotation complete)")

    # -- periodic -------------------------------------------------------------

    def _tick(self) -> None:
        try:
            if self.save_error is not None:
                self._save(quiet=True)  # space freed meanwhile? then what is held goes
            events = self.core.tick(self.now())
            if events:
                self._apply(events)
        except Exception:
            log.failure("tick failed")
        if not self._stopping:
            self._tick_call = self._reactor.callLater(self._tick_interval, self._tick)

    # -- the UI's API ---------------------------------------------------------

    def send_text(self, user_id: int, text: str, confirmed: bool = False) -> Refused | SendBlob:
        """Seal, save, send; a :class:`Refused` is returned for the UI to explain."""
        result = self.core.encrypt_message(user_id, text, self.now(), confirmed)
        if isinstance(result, Refused):
            return result
        self._apply([result], quiet=True)  # a failed save: the UI says so (is_held)
        return result

    def rekey(self, user_id: int) -> bool:
        """Start a key exchange; False if one is already running.  Raises
        ContactError for a removed or unlisted contact (nothing is sent to it),
        :class:`NotSaved` if it could not be saved (none is started)."""
        contact = self.core.contact(user_id)
        if contact.removed:
            raise ContactError(f"{contact.name} was removed from the server")
        if contact.unlisted:
            raise ContactError(
                f"{contact.name} is not on the server's user list; key exchanges with them "
                "pause until it lists them again"
            )
        with self._decision(f"key exchange with {contact.name} not started"):
            events = self.core.start_kex(user_id, self.now())
        if not events:
            self.out("info", f"a key exchange with {contact.name} is already running")
            return False
        self._send_events(events)
        return True

    def accept_new_ik(self, user_id: int) -> None:
        with self._decision(f"new identity key of {self._name(user_id)} not accepted"):
            events = self.core.accept_new_ik(user_id, self.now())
        self._send_events(events)

    def import_ik(self, user_id: int, text: str) -> None:
        with self._decision(f"identity key of {self._name(user_id)} not imported"):
            events = self.core.import_ik(user_id, text, self.now())
        self._send_events(events)

    def verify(self, user_id: int) -> None:
        with self._decision(f"{self._name(user_id)} not verified"):
            self.core.verify(user_id)

    def set_petname(self, user_id: int, petname: str | None) -> None:
        with self._decision(f"{user_id} not named {petname}"):
            self.core.set_petname(user_id, petname)

    @contextmanager
    def _decision(self, not_done: str) -> Iterator[None]:
        """Save the user's change made in this block (a name, a trust level, a
        key exchange, new server keys) before anything is shown or sent.  If
        the save fails the change is undone and :class:`NotSaved` raised: no
        restart takes back a change the user was told of.  An unchanged state
        needs no save."""
        before, keys = self.core.checkpoint(), self._pending_keys
        yield
        changed = self.core.state() != before.state or self._pending_keys is not keys
        if changed and not self._save(quiet=True):
            if self._save_written:
                # The file already holds the change: undoing it in memory would
                # tell the user it was not made while a restart shows it made.
                self.out(
                    "warn",
                    "the keystore was written, but its directory could not be synced "
                    f"({self.save_error}): the change is kept, and a crash of this machine "
                    "before the next save could undo it",
                )
                return
            self.core.rollback(before)
            self._pending_keys = keys
            raise NotSaved(not_done, self.save_error)

    def retry(self, prefix: str) -> SendBlob:
        matches = [e for e in self.core.outbox() if e.msg_id.hex().startswith(prefix.lower())]
        if not prefix or len(matches) != 1:
            raise ContactError(f"no single outbox message matches {prefix!r} (see /outbox)")
        item = self.core.retry(matches[0].msg_id)
        # A message held for a failed save is sent by this retry, not also by
        # the release of what was held once the retry's save succeeds.
        self._held.pop(item.msg_id, None)
        self._apply([item], quiet=True)  # a failed save: the UI says so (is_held)
        return item

    def rotate(self) -> None:
        """Make new keys (unless a rotation is pending), save them, then send
        them; :class:`NotSaved` if they could not be saved (none are made)."""
        with self._decision("keys not replaced"):
            if self._pending_keys is None:
                self._pending_keys = KeyPair.generate()
        keys = self._pending_keys
        self._enqueue(Rotate(keys.enc, keys.auth))

    def invite(self) -> bool:
        """Ask for a newcomer's token; False (and nothing sent) while offline."""
        if self.conn is None or not self._enrolled:
            return False
        self.invites_waiting += 1
        self._enqueue(Invite())
        return True

    def when_directory_handled(self) -> Deferred[None]:
        """Fires once this run has handled the server's first user list."""
        if self.directory_handled:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._directory_waiters.append(waiter)
        return waiter

    def still_failed(self) -> int:
        """How many of the messages reported failed in this run are failed still."""
        failed_entries = {e.msg_id for e in self.core.outbox() if e.status == "failed"}
        return sum(
            1
            for msg_id in self.failed_this_run
            if msg_id in failed_entries or self.core.status_of(msg_id) == "failed"
        )

    def pending_count(self) -> int:
        """Outbox entries waiting for ACCEPTED (not those held for a save)."""
        return sum(
            1 for e in self.core.outbox() if e.status == "pending" and e.msg_id not in self._held
        )

    async def wait_sent(self, timeout: float) -> bool:
        """True once nothing in the outbox waits for ACCEPTED (polls; bounded)."""
        deadline = self.now() + timeout
        while self.pending_count() and self.now() < deadline and not self._stopping:
            await deferLater(self._reactor, 0.05, lambda: None)
        return self.pending_count() == 0

    async def settle(self, timeout: float, quiet: float = 0.5) -> None:
        """Wait, at most ``timeout`` seconds, until this run has logged in and
        handled the server's DIRECTORY (the first thing of every session),
        nothing in the outbox waits for ACCEPTED, and nothing came from the
        server for ``quiet`` seconds (polls; for the end of a piped session)."""
        deadline = self.now() + timeout
        while self.now() < deadline and not self._stopping:
            if (
                self.directory_handled
                and self.pending_count() == 0
                and not self.invites_waiting
                and self.now() - self.last_heard >= quiet
            ):
                return
            await deferLater(self._reactor, 0.05, lambda: None)

    # -- helpers --------------------------------------------------------------

    def _outbox_entry(self, msg_id: bytes) -> Any:
        for entry in self.core.outbox():
            if entry.msg_id == msg_id:
                return entry
        return None

    def _name(self, user_id: int) -> str:
        try:
            return self.core.contact(user_id).name
        except ContactError:
            return str(user_id)

    def _show(self, event: Event) -> None:
        name = self._name(getattr(event, "peer", getattr(event, "sender", 0)))
        if isinstance(event, MessageReceived):
            self.out(
                "msg",
                f"{clock_text(event.unix_ms, self.now())} {name} ({event.trust.value}): "
                f"{event.text}",
            )
            if event.cut:
                self.out(
                    "warn",
                    f"{name}'s message was longer than a message may be ({MAX_TEXT} bytes): "
                    f"its last {event.cut} bytes were cut",
                )
        elif isinstance(event, KexCompleted):
            if event.first:
                contact = self.core.contact(event.peer)
                self.out(
                    "kex",
                    f"keys agreed with {name} (epoch {event.epoch}); trust: "
                    f"{contact.trust.value} — compare safety numbers with /verify {name}",
                )
            else:
                self.out("kex", f"new keys with {name} (epoch {event.epoch})")
        elif isinstance(event, KexRetried):
            self.out("kex", f"key exchange with {name}: offer sent again ({event.offers_sent})")
        elif isinstance(event, KexStuck):
            self.out("kex", f"key exchange with {name} not complete — is {name} offline?")
        elif isinstance(event, KexFailed):
            self.out("warn", f"key exchange with {name} failed: {event.reason}")
        elif isinstance(event, IdentityKeyChanged):
            self.out(
                "warn",
                f"{name}'s identity key CHANGED. Sending to {name} is blocked. New safety "
                f"number: {_one_line(event.safety_number)}. Check it with {name}, then "
                f"/accept {name}",
            )
        elif isinstance(event, BlobHeld):
            log.debug("held a blob from {sender}: {why}", sender=event.sender, why=event.reason)
        elif isinstance(event, BlobFromRemoved):
            self.out(
                "warn",
                f"refused a message under the id of removed user {name} "
                f"({event.sender}): a removed user never comes back under the same id "
                "(is someone tampering with the server?)",
            )
        elif isinstance(event, BlobDropped) and event.reason != "duplicate":
            log.info("dropped a blob from {sender}: {why}", sender=event.sender, why=event.reason)
            if event.reason in UNOPENED_TEXT:
                self._warn_unopened(event.sender, name, UNOPENED_TEXT[event.reason])

    def _warn_unopened(self, sender: int, name: str, why: str) -> None:
        """A message that will never open: say so, at most once per contact per
        :data:`UNOPENED_WARN_INTERVAL` (a server can inject such blobs at will)."""
        now = self.now()
        last = self._unopened_warned.get(sender)
        if last is not None and now < last + UNOPENED_WARN_INTERVAL:
            return
        self._unopened_warned[sender] = now
        self.out(
            "warn",
            f"a message from {name} could not be opened: {why}; if one is missing, ask "
            f"{name} to send it again",
        )


def _tls_refused(text: str) -> bool:
    """Does a connection failure's text say the certificate check failed?"""
    lowered = text.lower()
    return any(w in lowered for w in ("certificate", "verificationerror", "mismatch"))


def _advised_wait(error: BaseException) -> float:
    """Seconds a RATE_LIMITED refusal asks to wait ("retry in N s"), else 0."""
    if not isinstance(error, LoginFailed) or error.code != ErrorCode.RATE_LIMITED:
        return 0.0
    match = re.search(r"retry in (\d+(?:\.\d+)?) s", error.text)
    # At most the server's own cap: the text comes before the handshake, so
    # on a plain connection anyone on the path could write it.
    return min(float(match.group(1)), 300.0) + 0.5 if match else 0.0


def _not_tls(text: str) -> bool:
    """Does a TLS connection failure's text say the server answered in plain bytes?"""
    lowered = text.lower()
    return any(
        w in lowered for w in ("wrong version number", "unknown protocol", "packet length too long")
    )


def _one_line(digits: str) -> str:
    return " ".join(digits.split())


def clock_text(unix_ms: int, now: float | None = None) -> str:
    """``HH:MM:SS`` in local time for a moment of today (``now``, in seconds;
    default the current time), ``YYYY-MM-DD HH:MM:SS`` for any other day."""
    moment = time.localtime(unix_ms / 1000)
    today = time.localtime(time.time() if now is None else now)
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)


def date_text(unix_ms: int) -> str:
    """``YYYY-MM-DD HH:MM local time`` (with the offset from UTC)."""
    moment = time.localtime(unix_ms / 1000)
    return time.strftime("%Y-%m-%d %H:%M local time (UTC%z)", moment)


def _reason(error: BaseException) -> str:
    if isinstance(error, LoginFailed):
        return error.text if error.code == 0 else f"{_code_name(error.code)}: {error.text}"
    if isinstance(error, defer.TimeoutError):
        return "timed out"
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
