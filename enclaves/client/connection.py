"""Client side of the client-server session: a thin Twisted adapter.

Typical use::

    conn = await connect(reactor, "tcp:host=example.org:port=7500", user_id, keys)
    conn.on_message = handle          # or read conn.inbox (a DeferredQueue)
    conn.send(Send(msg_id, recipient, blob))
    reason = await conn.closed        # Disconnected(code, text)

The handshake and sealing are :mod:`enclaves.handshake` and
:mod:`enclaves.session`; this module only moves bytes.  PING is answered with
PONG automatically.  Outgoing messages queued in the same turn of the reactor
are coalesced into one sealed frame.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from enclaves.crypto import KeyPair
from enclaves.frames import (
    MAX_FRAME,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_error,
)
from enclaves.handshake import ClientHandshake, HandshakeError
from enclaves.inner import (
    NO_MSG_ID,
    Accepted,
    Deliver,
    Delivered,
    Directory,
    Error,
    InnerMessage,
    Ping,
    Pong,
)
from enclaves.session import Session, SessionError, max_blob_size
from enclaves.transport import no_nagle, write_now

__all__ = [
    "MAX_DIRECTORY",
    "ClientConnection",
    "ClientConnectionFactory",
    "Disconnected",
    "LoginFailed",
    "NotAnEnclavesServer",
    "connect",
]


# Handed to the application as they are (the others may need the connection first).
_PLAIN_KINDS = frozenset({Deliver, Accepted, Delivered})
# User ids a DIRECTORY may carry over all its parts: they are joined in memory
# before the application sees them, so a server that never sends the last part
# must not make the client keep them without bound.  Ten times the contacts a
# keystore holds (enclaves.client.contacts.MAX_CONTACTS); 8 MB on the wire.
MAX_DIRECTORY = 1_000_000


class LoginFailed(Exception):
    """The server refused the handshake (``code`` is an ErrorCode value, or 0)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{_code_name(code)}: {text}")
        self.code = code
        self.text = text


class NotAnEnclavesServer(LoginFailed):
    """The first bytes from the server are no Enclaves frame: something else
    (an SSH or web server, say) listens there.  ``text`` says what it looks like."""

    def __init__(self, text: str) -> None:
        super().__init__(0, text)


def _is_text(first: bytes) -> bool:
    """Do the first bytes read as text (a greeting such as ``SSH-2.0-...`` or
    ``HTTP/1.1 400``)?  An Enclaves frame starts with its u32 length, whose
    first two bytes are zero (for frames under 64 KiB), and one bit flipped
    on the way (a network attacker's) leaves one of them zero: such a frame
    ends that connection with its own code (docs/security.rst), it is not
    taken for another kind of server, which would end the client's run."""
    return len(first) >= 4 and all(0x20 <= c < 0x7F for c in first[:4])


def _looks_like(first: bytes) -> str:
    """What a server whose first bytes are ``first`` seems to be."""
    if first.startswith(b"SSH-"):
        return "it looks like an SSH server"
    if first.startswith(b"HTTP/"):
        return "it looks like a web server"
    if first[:3].isdigit() and first[3:4] in (b" ", b"-"):
        return "it looks like a mail or FTP server"  # "220 ..." greetings
    return "its first bytes are no Enclaves frame"


@frozen
class Disconnected:
    """Why a connection ended: the server's ERROR ``code``/``text`` if it sent one.

    ``code`` is None when the connection simply closed (or we closed it).
    """

    code: int | None
    text: str

    @property
    def name(self) -> str:
        return _code_name(self.code) if self.code is not None else "CLOSED"


def _code_name(code: int | None) -> str:
    if code is None:
        return "CLOSED"
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"ERROR {code}"


class ClientConnection(Protocol):
    """One authenticated session with the server.

    ``ready`` fires with this connection once WELCOME checked out, or fails with
    :class:`LoginFailed`.  ``closed`` fires with a :class:`Disconnected` when the
    connection ends, whatever the reason.  Inner messages from the server go to
    ``on_message`` if set, else into ``inbox`` (a ``DeferredQueue``).  Per-message
    ERRORs (a non-zero ``msg_id``) are inner messages like any other; a session
    ERROR (zero ``msg_id``) becomes the ``closed`` reason.  An outer (unsealed)
    ERROR frame after WELCOME is unauthenticated: it closes the connection as
    a plain close (code None), its text is ignored.
    """

    log = Logger()

    def __init__(
        self,
        user_id: int,
        keys: KeyPair,
        *,
        clock: Any = None,
        max_frame: int = MAX_FRAME,
        on_message: Callable[[InnerMessage], None] | None = None,
        handshake: ClientHandshake | None = None,
        hand_over_pings: bool = False,
    ) -> None:
        self.user_id = user_id
        # True: the server's PINGs go to the application, which answers once
        # it has handled (and saved) what came before them; else answered here.
        self.hand_over_pings = hand_over_pings
        self._handshake = handshake or ClientHandshake(user_id, keys)
        self._clock = clock
        if max_frame > MAX_FRAME:
            raise ValueError(f"max_frame {max_frame} is above the protocol's {MAX_FRAME}")
        #: The largest frame sent (coalescing stops there); frames up to the
        #: protocol's MAX_FRAME are accepted whatever it is.
        self.max_frame = max_frame
        self.on_message = on_message
        self.inbox: DeferredQueue[InnerMessage] = DeferredQueue()
        self.ready: Deferred[ClientConnection] = Deferred()
        self.closed: Deferred[Disconnected] = Deferred()
        self._decoder = FrameDecoder(MAX_FRAME)
        self._session: Session | None = None
        self._queue: list[InnerMessage] = []
        self._flush_call: Any = None
        self._receiving = False  # inside dataReceived, which flushes at its end
        self._reason: Disconnected | None = None
        self._done = False
        self._login_nonce: int | None = None
        self._directory_parts: list[int] = []
        self._first_bytes = b""  # before the first whole frame: what the server sent
        self._not_enclaves: str | None = None
        self._frames_seen = False

    def __repr__(self) -> str:
        return f"<ClientConnection user={self.user_id}>"

    @property
    def max_blob(self) -> int:
        """The largest e2e blob one SEND can carry with this frame limit (a
        server may take less: it refuses a larger one with MESSAGE_TOO_LARGE)."""
        return max_blob_size(self.max_frame)

    @property
    def established(self) -> bool:
        return self._session is not None and not self._done

    # -- Twisted hooks ----------------------------------------------------------

    def connectionMade(self) -> None:
        no_nagle(self.transport)
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        self._write(self._handshake.hello_frame())

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        first_frame = self._session is None and not self.ready.called
        if first_frame and len(self._first_bytes) < 16:
            self._first_bytes += data[: 16 - len(self._first_bytes)]
        try:
            frames = self._decoder.feed(data)
        except FrameError as error:
            if first_frame and not self._frames_seen and _is_text(self._first_bytes):
                # Text before one frame: another kind of server.
                self._not_enclaves = _looks_like(self._first_bytes)
            self._abort(Disconnected(int(error.code), f"bad frame from the server: {error}"))
            return
        if frames:
            self._frames_seen = True
        self._receiving = True
        try:
            for frame in frames:
                if self._done:
                    return
                self._frame_received(frame)
        finally:
            self._receiving = False
        self.flush()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._done = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        result = self._reason or Disconnected(None, "connection closed")
        if not self.ready.called:
            text = result.text
            if self._reason is None:  # e.g. a TLS certificate check failed
                text = f"{text}: {reason.getErrorMessage()}"
            if self._not_enclaves is not None:
                self.ready.errback(NotAnEnclavesServer(self._not_enclaves))
            else:
                self.ready.errback(LoginFailed(result.code or 0, text))
        self.closed.callback(result)

    # -- frames -------------------------------------------------------------------

    def _frame_received(self, frame: Frame) -> None:
        if frame.type is FrameType.ERROR:
            if self._session is not None:
                # Unauthenticated once the session exists (anyone on the path
                # can inject one): a plain close, its text is never shown.
                self.log.info("outer ERROR frame inside a session: closing")
                self._reason = self._reason or Disconnected(None, "connection closed")
                self._done = True
                self._lose()
                return
            try:
                code, text = decode_error(frame.payload)
            except FrameError:
                code, text = int(ErrorCode.BAD_FRAME), "malformed ERROR frame"
            self._reason = Disconnected(code, text)
            self._done = True
            self._lose()
        elif frame.type is FrameType.WELCOME and self._session is None:
            try:
                keys = self._handshake.receive_welcome(frame.payload)
            except HandshakeError as error:
                self._abort(Disconnected(int(error.code), error.text))
                return
            self._session = Session(keys, "client", self.max_frame)
            # The server goes live only on our first sealed frame: send one now.
            (self._login_nonce,) = struct.unpack(">Q", os.urandom(8))
            self.send(Ping(self._login_nonce))
            self.ready.callback(self)
        elif frame.type is FrameType.SEALED and self._session is not None:
            try:
                messages = self._session.open(frame.payload)
            except SessionError as error:
                self._abort(Disconnected(int(error.code), error.text))
                return
            for message in messages:
                if self._done:  # a message before this one ended the session
                    return
                self._message_received(message)
        else:
            self._abort(Disconnected(int(ErrorCode.BAD_FRAME), f"unexpected {frame.type.name}"))

    def _message_received(self, message: InnerMessage) -> None:
        if type(message) in _PLAIN_KINDS:  # nearly all traffic: straight through
            self._hand_over(message)
            return
        if isinstance(message, Ping) and not self.hand_over_pings:
            self.send(Pong(message.nonce))
            return
        if isinstance(message, Pong) and message.nonce == self._login_nonce:
            self._login_nonce = None  # the answer to our login PING
            return
        if isinstance(message, Directory):
            # Parts with ``more`` set are joined: the application sees one list.
            if len(self._directory_parts) + len(message.user_ids) > MAX_DIRECTORY:
                self._directory_parts = []
                self._abort(
                    Disconnected(
                        int(ErrorCode.BAD_MESSAGE),
                        f"the server's DIRECTORY lists more than {MAX_DIRECTORY} users",
                    )
                )
                return
            self._directory_parts.extend(message.user_ids)
            if message.more:
                return
            message = Directory(tuple(self._directory_parts))
            self._directory_parts = []
        if isinstance(message, Error) and message.msg_id == NO_MSG_ID:
            # A session ERROR: the server closes right after it.
            self._reason = Disconnected(message.code, message.text)
        self._hand_over(message)

    def _hand_over(self, message: InnerMessage) -> None:
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                self.log.failure("on_message raised")
        else:
            self.inbox.put(message)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            write_now(self.transport, data)

    def _lose(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _abort(self, reason: Disconnected) -> None:
        self.log.info("closing: {code} {text}", code=reason.name, text=reason.text)
        self._reason = reason
        self._done = True
        self._lose()

    # -- the application's API ---------------------------------------------------------

    def send(self, message: InnerMessage) -> None:
        """Queue one inner message; it is sealed (with others queued) shortly."""
        if self._session is None:
            raise RuntimeError("no session yet: wait for ready")
        if self._done:
            return
        self._queue.append(message)
        if self._flush_call is None and not self._receiving:
            self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Seal and write everything queued now (normally done automatically)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._queue or self._session is None or self._done:
            return
        queue, self._queue = self._queue, []
        self._write(self._session.seal(queue))

    def disconnect(self) -> Deferred[Disconnected]:
        """Flush, close the connection; returns ``closed``."""
        if not self._done:
            self.flush()
            self._done = True
            self._lose()
        return self.closed


class ClientConnectionFactory(Factory):
    """Builds a :class:`ClientConnection` for one user's credentials."""

    def __init__(self, user_id: int, keys: KeyPair, **kwargs: Any) -> None:
        self.user_id, self.keys, self.kwargs = user_id, keys, kwargs

    def buildProtocol(self, addr: Any) -> ClientConnection:
        protocol = ClientConnection(self.user_id, self.keys, **self.kwargs)
        protocol.factory = self
        return protocol


def connect(
    reactor: Any,
    endpoint: str | IStreamClientEndpoint,
    user_id: int,
    keys: KeyPair,
    *,
    max_frame: int = MAX_FRAME,
    on_message: Callable[[InnerMessage], None] | None = None,
    timeout: float = 30.0,
    hand_over_pings: bool = False,
) -> Deferred[ClientConnection]:
    """Connect to ``endpoint`` (a ``clientFromString`` description, or an
    endpoint object such as a TLS-wrapped one) and log in.

    Fires with the established :class:`ClientConnection`; fails with
    :class:`LoginFailed` if the server refuses or sends no WELCOME within
    ``timeout`` seconds, or with the connection error.
    """

    async def run() -> ClientConnection:
        protocol = ClientConnection(
            user_id,
            keys,
            clock=reactor,
            max_frame=max_frame,
            on_message=on_message,
            hand_over_pings=hand_over_pings,
        )
        target = clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        await connectProtocol(target, protocol)
        try:
            return await protocol.ready.addTimeout(timeout, reactor)
        except defer.TimeoutError:
            protocol.disconnect()
            raise LoginFailed(int(ErrorCode.HANDSHAKE_TIMEOUT), "no WELCOME in time") from None

    return ensureDeferred(run())
