"""Server-side connection: a thin Twisted adapter over the sans-IO machines.

:class:`ServerProtocol` feeds bytes to :class:`~enclaves.frames.FrameDecoder`,
HELLO to :class:`~enclaves.handshake.ServerHandshake` (looking the user up in
storage in between), and SEALED frames to :class:`~enclaves.session.Session`;
inner messages go to the :class:`~enclaves.server.router.Router`.  Outgoing
inner messages are queued and sealed together on the next turn of the reactor.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from enclaves.frames import (
    DEFAULT_MAX_FRAME,
    MAX_FRAME,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    encode_error,
    encode_frame,
)
from enclaves.handshake import HandshakeError, ServerHandshake
from enclaves.inner import NO_MSG_ID, Error, InnerMessage, Ping
from enclaves.server.limits import FailureLimiter, is_ip_address, source_key
from enclaves.server.router import Router
from enclaves.session import Session, SessionError
from enclaves.storage.interface import IStorage, UserRecord
from enclaves.transport import LINGER_SECONDS, close_after_output, no_nagle, write_now

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HANDSHAKES_PER_ADDRESS",
    "ServerFactory",
    "ServerProtocol",
    "default_handshakes_per_address",
]

DEFAULT_HANDSHAKE_TIMEOUT = 10
DEFAULT_IDLE_TIMEOUT = 300
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_LINGERING = 256  # closed connections at once waiting (<= 2 s) for the peer
DEFAULT_MAX_HANDSHAKES_PER_ADDRESS = 32

HANDSHAKES_PER_ADDRESS_TEXT = (
    "too many connections from your address are logging in at once; retry shortly"
)


def default_handshakes_per_address(max_connections: int) -> int:
    """Connections not yet logged in one source may hold when no option says:
    32, or a quarter of ``max_connections`` if that is less (at least 1), so
    that one address never holds most of a small server's slots."""
    return max(1, min(DEFAULT_MAX_HANDSHAKES_PER_ADDRESS, max_connections // 4))


_SEALED = FrameType.SEALED
_HANDSHAKE, _LOOKUP, _PROVING, _SESSION, _CLOSED = (
    "handshake",
    "lookup",
    "proving",  # WELCOME sent; live only once a SEALED frame opens with the keys
    "session",
    "closed",
)

# Why the server itself may end a connection before its session is live; none
# of these is the peer's failed handshake (docs/protocol.rst, "Limits").
_NOT_A_FAILED_HANDSHAKE = frozenset(
    {
        ErrorCode.SERVER_BUSY,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.STORAGE_FAILED,
        ErrorCode.TOKEN_EXPIRED,
    }
)


class ServerProtocol(Protocol, TimeoutMixin):
    """One client connection: handshake, then a sealed session bound to the router.

    Before a session exists every failure is an ERROR frame; afterwards a
    sealed inner ERROR.  Either way the connection is then dropped.

    A verified HELLO proves nothing (it can be a replay): the session goes live
    (router login, REPLACED of an older session, pending delivery) only when the
    client's first SEALED frame opens, which proves it holds the session keys.

    Until it is live (or closed) a connection counts against its source's
    share of handshakes (``ServerFactory.max_handshakes_per_address``, keyed
    by :func:`~enclaves.server.limits.source_key`); one over it is refused
    ``RATE_LIMITED`` at once.  Live sessions do not count: many users behind
    one NAT are fine.

    A connection that leaves the handshake any other way is a failed handshake
    for its source's backoff (:class:`~enclaves.server.limits.FailureLimiter`):
    refused (bad HELLO, bad first SEALED frame, bad frame), timed out, or gone
    after sending anything — unless the server ended it for a reason of its
    own (``_NOT_A_FAILED_HANDSHAKE``) or the peer left without a byte (a port
    probe).
    """

    log = Logger()
    factory: ServerFactory
    user_id: int = 0

    def __init__(self) -> None:
        self._state = _HANDSHAKE
        self._session: Session | None = None
        self._queue: list[InnerMessage | bytes] = []  # bytes: already encoded
        self._flush_soon = False  # in the factory's list of protocols to flush
        self._pinged = False
        self._peer = "?"
        self._record: UserRecord | None = None
        self._live = False
        self._paused = False
        self._linger: Any = None
        # Its source (a key of ServerFactory.handshaking) while the connection
        # is accepted and neither live nor ended.
        self._source: str | None = None  # counted in its source's share, until the end
        # Per-source limits (backoff, share) apply to IP peers only: a UNIX
        # socket's peers have no address, and one key would make a stranger's
        # failures everyone's.
        self._per_source = False
        self._heard = False  # the peer sent at least one byte

    def __repr__(self) -> str:
        return f"<ServerProtocol {self._peer} user={self.user_id} {self._state}>"

    # -- Twisted hooks ----------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        # TimeoutMixin schedules with the injected clock.
        self.callLater = factory.clock.callLater  # type: ignore[method-assign]
        assert self.transport is not None
        no_nagle(self.transport)
        peer = self.transport.getPeer()
        self._host = getattr(peer, "host", str(peer))
        self._peer = str(getattr(peer, "host", peer)) + ":" + str(getattr(peer, "port", ""))
        # Every peer accepts frames up to the protocol's limit, whatever
        # --max-frame says: that bounds only what this server sends.
        self._decoder = FrameDecoder(MAX_FRAME)
        self._handshake = ServerHandshake()
        # Backpressure: the transport pauses us when its write buffer is full,
        # and we stop reading from this client until it drains.
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        factory.connection_made(self)
        if len(factory.protocols) > factory.max_connections:
            factory.router.connection_refused("busy")
            self.fail(ErrorCode.SERVER_BUSY, "the server has too many connections")
            return
        self._per_source = is_ip_address(self._host)
        if not self._per_source:
            self.setTimeout(factory.handshake_timeout)
            return
        wait = factory.limiter.blocked_for(self._host, factory.clock.seconds())
        if wait > 0:
            factory.router.connection_refused("backoff")
            self.fail(
                ErrorCode.RATE_LIMITED,
                f"too many failed handshakes from your address; retry in {int(wait) + 1} s",
            )
            return
        self._source = factory.handshake_started(self._host)
        if self._source is None:
            factory.router.connection_refused("share")
            self.fail(ErrorCode.RATE_LIMITED, HANDSHAKES_PER_ADDRESS_TEXT)
            return
        self.setTimeout(factory.handshake_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        self._heard = self._heard or bool(data)
        factory = self.factory
        factory.reading += 1
        try:
            try:
                frames = self._decoder.feed(data)
            except FrameError as error:
                self._error(error.code, str(error))
                return
            for frame in frames:
                state = self._state
                if state == _SESSION and frame.type is _SEALED:  # nearly every frame
                    self._sealed_received(frame.payload)
                elif state == _CLOSED:
                    return
                else:
                    self._frame_received(frame)
        finally:
            factory.reading -= 1
            if not factory.reading:
                factory.flush_all()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        was_session = self._live
        # Gone during the handshake: a failure if it had sent anything (a
        # HELLO replayed for its WELCOME, then dropped, is one).
        self._handshake_over(failed=self._heard)
        self._state = _CLOSED
        self.setTimeout(None)
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self.factory.lingering.discard(self)
        self._queue = []
        if was_session:
            self.log.info(
                "session of user {user_id} ({peer}) ended: {why}",
                user_id=self.user_id,
                peer=self._peer,
                why=reason.getErrorMessage(),
            )
            self.factory.router.logout(self)
        self.factory.connection_lost(self)

    # -- IPushProducer: output backpressure ----------------------------------------

    def pauseProducing(self) -> None:
        """Our output to this client is backed up: stop reading its requests."""
        self._paused = True
        if self.transport is not None and self._state != _CLOSED:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        """The client read its output: read its requests again."""
        self._paused = False
        if self.transport is not None and self._state != _CLOSED:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost does the clean-up."""

    def timeoutConnection(self) -> None:
        if self._state in (_HANDSHAKE, _LOOKUP, _PROVING):
            self.close(ErrorCode.HANDSHAKE_TIMEOUT, "no handshake in time")
        elif self._state == _SESSION:
            if self._pinged:
                self.close(ErrorCode.IDLE_TIMEOUT, "no traffic in time")
                return
            self._pinged = True
            (nonce,) = struct.unpack(">Q", os.urandom(8))
            self.send(Ping(nonce))
            self.setTimeout(self.factory.idle_timeout / 2)

    # -- frames -----------------------------------------------------------------------

    def _frame_received(self, frame: Frame) -> None:
        if frame.type is FrameType.ERROR:
            self.log.info("{peer} sent an ERROR frame; closing", peer=self._peer)
            self._drop()
        elif self._state in (_PROVING, _SESSION) and frame.type is FrameType.SEALED:
            self._sealed_received(frame.payload)
        elif self._state == _HANDSHAKE and frame.type is FrameType.HELLO:
            self._hello_received(frame.payload)
        else:
            self._error(ErrorCode.BAD_FRAME, f"unexpected {frame.type.name} frame")

    def _hello_received(self, payload: bytes) -> None:
        try:
            user_id = self._handshake.receive_hello(payload)
        except HandshakeError as error:
            self.fail(error.code, error.text)
            return
        self._state = _LOOKUP
        storage: Any = self.factory.storage
        storage.load_user(user_id).addCallbacks(self._user_loaded, self._lookup_failed)

    def _lookup_failed(self, failure: Failure) -> None:
        self.log.failure("user lookup failed", failure)
        if self._state == _LOOKUP:
            self.fail(ErrorCode.STORAGE_FAILED, "the server could not read its storage")

    def _user_loaded(self, record: UserRecord | None) -> None:
        if self._state != _LOOKUP:
            return  # the connection went away while we looked
        factory = self.factory
        try:
            welcome, keys = self._handshake.authenticate(record)
        except HandshakeError as error:
            self.fail(error.code, error.text)
            return
        assert record is not None
        now_ms = int(factory.clock.seconds() * 1000)
        expires = record.enrollment_expires_ms
        if expires is not None and now_ms > expires:
            self.fail(
                ErrorCode.TOKEN_EXPIRED,
                "the enrollment token has expired; ask the admin for a new one",
            )
            return
        self.user_id = record.user_id
        self._record = record
        self._session = Session(keys, "server", factory.max_frame)
        self._state = _PROVING  # still under the handshake timeout
        self._write(welcome)

    def _go_live(self) -> None:
        """The first SEALED frame opened: the peer has the keys; log in."""
        assert self._record is not None
        self._handshake_over(failed=False)
        self._state = _SESSION
        self._live = True
        self.setTimeout(self.factory.idle_timeout / 2)
        self.factory.router.login(self, self._record)
        self._record = None

    def _sealed_received(self, payload: bytes) -> None:
        assert self._session is not None
        try:
            messages = self._session.open_routed(payload)
        except SessionError as error:
            self.close(error.code, error.text)
            return
        if self._state == _PROVING:
            self._go_live()
        self._pinged = False
        self.resetTimeout()
        self.factory.router.messages_received(self, messages)

    def _handshake_over(self, failed: bool) -> None:
        """The connection leaves the handshake (live, refused, timed out or gone);
        it leaves its source's share of handshakes, and a failure counts against
        the source's backoff, once."""
        if not self._per_source:
            return
        factory = self.factory
        if self._source is not None:
            factory.handshake_ended(self._source)
            self._source = None
        self._per_source = False  # once
        if not failed:
            return
        now = factory.clock.seconds()
        was_blocked = factory.limiter.blocked_for(self._host, now) > 0
        factory.limiter.failed(self._host, now)
        wait = factory.limiter.blocked_for(self._host, now)
        if wait > 0 and not was_blocked:
            self.log.info(
                "too many failed handshakes from {source}: refusing its connections "
                "for {seconds} s",
                source=source_key(self._host),
                seconds=round(wait, 1),
            )

    # -- output -----------------------------------------------------------------------

    def send(self, message: InnerMessage | bytes) -> None:
        """Queue an inner message (or ``bytes``: messages already encoded);
        queued messages are sealed together shortly."""
        if self._state != _SESSION:
            return
        self._queue.append(message)
        if not self._flush_soon:
            self._flush_soon = True
            self.factory.flush_soon(self)

    send_encoded = send  # the router's Peer.send_encoded: the queue takes both

    def _flush(self) -> None:
        if not self._queue or self._session is None or self._state == _CLOSED:
            return
        queue, self._queue = self._queue, []
        try:
            data = self._session.seal(queue)
        except (ValueError, SessionError) as error:
            # A message that fits no frame (or sequence numbers exhausted): a
            # bug or a misconfiguration, never a traceback in a Deferred.
            self.log.error(
                "cannot seal output for user {user_id}: {error}; closing",
                user_id=self.user_id,
                error=str(error),
            )
            self._seal_failed()
            return
        self._write(data)

    def _seal_failed(self) -> None:
        assert self._session is not None
        if self._state == _SESSION:
            try:
                text = "the server could not fit its output in a frame"
                error = Error(int(ErrorCode.MESSAGE_TOO_LARGE), NO_MSG_ID, text)
                self._write(self._session.seal([error]))
            except (ValueError, SessionError):
                pass
        self._drop()

    def close(self, code: ErrorCode, text: str) -> None:
        """End the session: a sealed ERROR after whatever is queued, then drop.

        Between WELCOME and the first SEALED frame the ERROR is sealed too, so
        an honest client learns the real reason; it tells a replayer nothing.
        """
        if self._state == _PROVING and self._session is not None:
            self._handshake_over(failed=code not in _NOT_A_FAILED_HANDSHAKE)
            self.log.info(
                "dropping {peer}: {code} {text}", peer=self._peer, code=code.name, text=text
            )
            try:
                self._write(self._session.seal([Error(int(code), NO_MSG_ID, text)]))
            except (ValueError, SessionError):
                pass
            self._drop()
            return
        if self._state != _SESSION:
            self.fail(code, text)
            return
        self.log.info(
            "closing session of {user_id} ({peer}): {code} {text}",
            user_id=self.user_id,
            peer=self._peer,
            code=code.name,
            text=text,
        )
        self._queue.append(Error(int(code), NO_MSG_ID, text))
        self._flush()
        self._drop()

    def fail(self, code: ErrorCode, text: str) -> None:
        """Before a session: an ERROR frame, a log line, and a dropped connection."""
        if self._state == _CLOSED:
            return
        self._handshake_over(failed=code not in _NOT_A_FAILED_HANDSHAKE)
        self.log.info("dropping {peer}: {code} {text}", peer=self._peer, code=code.name, text=text)
        self._write(encode_frame(FrameType.ERROR, encode_error(code, text)))
        self._drop()

    def _error(self, code: ErrorCode, text: str) -> None:
        if self._state in (_SESSION, _PROVING):
            self.close(code, text)
        else:
            self.fail(code, text)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            write_now(self.transport, data)

    def _drop(self) -> None:
        self._handshake_over(failed=True)  # e.g. the peer sent an ERROR frame
        if self._live:
            # Detach now, so nothing more is routed to this session.
            self.factory.router.logout(self)
        self._state = _CLOSED
        self._queue = []
        self.setTimeout(None)
        if self.transport is None:
            return
        transport: Any = self.transport
        if self._paused:
            # Its output is backed up: a client that does not read would hold
            # the connection open forever waiting for a graceful close.
            transport.abortConnection()
            return
        if self._linger is not None:
            return  # already closing
        factory = self.factory
        if len(factory.lingering) < factory.max_lingering:
            self._linger = close_after_output(transport, factory.clock)
            if self._linger is not None:
                # Half-closed, reading until the peer closes (at most
                # LINGER_SECONDS): it holds no connection slot, and few linger.
                factory.lingering.add(self)
                factory.connection_lost(self)
                return
        else:
            transport.loseConnection()
        # Any other close (TLS, or too many lingering) keeps its slot until the
        # socket is gone, and goes within LINGER_SECONDS even if the client
        # never reads what is still buffered for it.
        self._linger = factory.clock.callLater(LINGER_SECONDS, transport.abortConnection)


class ServerFactory(Factory):
    """Builds :class:`ServerProtocol` instances sharing the server's settings."""

    protocol = ServerProtocol  # type: ignore[assignment]
    noisy = False
    log = Logger()

    def __init__(
        self,
        router: Router,
        storage: IStorage,
        clock: Any,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        limiter: FailureLimiter | None = None,
        max_lingering: int = DEFAULT_MAX_LINGERING,
        max_handshakes_per_address: int | None = None,
    ) -> None:
        if max_frame > MAX_FRAME:
            raise ValueError(f"max_frame {max_frame} is above the protocol's {MAX_FRAME}")
        self.router = router
        self.storage = storage
        self.clock = clock
        #: The largest frame this server sends (--max-frame); it accepts MAX_FRAME.
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.limiter = limiter if limiter is not None else FailureLimiter()
        if max_handshakes_per_address is None:
            max_handshakes_per_address = default_handshakes_per_address(max_connections)
        self.max_handshakes_per_address = max_handshakes_per_address
        # source_key -> its connections not yet live (nor closed); an entry goes
        # with its last connection, so this never outgrows the connections.
        self.handshaking: dict[str, int] = {}
        self.protocols: set[ServerProtocol] = set()
        self.lingering: set[ServerProtocol] = set()  # closed, waiting for the peer's close
        self.max_lingering = max_lingering
        self._to_flush: list[ServerProtocol] = []
        # Reads under way (dataReceived, nested or not): output queued meanwhile
        # is flushed when the outermost one ends, with no timed call.
        self.reading = 0

    def flush_soon(self, protocol: ServerProtocol) -> None:
        """Seal ``protocol``'s queued output with all others: at the end of the
        read under way, or else on the next reactor turn."""
        if not self._to_flush and not self.reading:
            self.clock.callLater(0, self.flush_all)
        self._to_flush.append(protocol)

    def flush_all(self) -> None:
        """Seal and write every session's queued output, one frame each where it fits."""
        if not self._to_flush:
            return
        protocols, self._to_flush = self._to_flush, []
        for protocol in protocols:
            protocol._flush_soon = False
        for protocol in protocols:
            try:
                protocol._flush()
            except Exception:
                # A bug in one session must not stall the output of the others.
                self.log.failure("flushing output for user {user_id}", user_id=protocol.user_id)
                protocol._drop()

    def handshake_started(self, host: str) -> str | None:
        """Count a new connection from ``host`` as handshaking; its source key,
        or None if that source already has its share."""
        source = source_key(host)
        count = self.handshaking.get(source, 0)
        if self.max_handshakes_per_address and count >= self.max_handshakes_per_address:
            return None
        self.handshaking[source] = count + 1
        return source

    def handshake_ended(self, source: str) -> None:
        count = self.handshaking[source] - 1
        if count:
            self.handshaking[source] = count
        else:
            del self.handshaking[source]

    def connection_made(self, protocol: ServerProtocol) -> None:
        self.protocols.add(protocol)
        self.router.connection_opened()

    def connection_lost(self, protocol: ServerProtocol) -> None:
        if protocol in self.protocols:
            self.protocols.discard(protocol)
            self.router.connection_closed()

    def disconnect_all(self) -> None:
        """Close every connection with SHUTTING_DOWN (sessions first store in-flight work)."""
        for protocol in list(self.protocols):
            protocol.close(ErrorCode.SHUTTING_DOWN, "the server is stopping")
