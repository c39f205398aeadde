"""A deterministic server (MemoryStorage, task.Clock) and raw clients over StringTransport."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from enclaves.crypto import KeyPair
from enclaves.frames import MAX_FRAME, Frame, FrameDecoder, FrameType, decode_error
from enclaves.handshake import ClientHandshake
from enclaves.inner import InnerMessage, Ping, Pong
from enclaves.server.protocol import ServerFactory, ServerProtocol
from enclaves.server.router import Router
from enclaves.session import Session
from enclaves.storage.memory import MemoryStorage

NOW = 1_800_000_000.0
_ports = itertools.count(40000)
LOGIN_NONCE = 0x5EA1ED


class Harness:
    """Server side of protocol tests: every piece real, time and storage in memory."""

    def __init__(self, *, router: dict[str, Any] | None = None, **factory: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.storage = MemoryStorage(
            max_pending_count=50, max_pending_bytes=100_000, clock=self.clock.seconds
        )
        self.router = Router(self.storage, self.clock, **(router or {}))
        self.factory = ServerFactory(self.router, self.storage, self.clock, **factory)

    def add_user(self, user_id: int, enrolling_for: float | None = None) -> KeyPair:
        keys = KeyPair.generate()
        expires = None if enrolling_for is None else int((NOW + enrolling_for) * 1000)
        self.storage.add_user(user_id, keys, expires)
        return keys

    def raw(self, user_id: int, keys: KeyPair, host: str = "192.0.2.1") -> RawClient:
        return RawClient(self, user_id, keys, host)


class RawClient:
    """A client made of the sans-IO machines, talking to a ServerProtocol directly."""

    def __init__(self, harness: Harness, user_id: int, keys: KeyPair, host: str) -> None:
        self.harness = harness
        kind = IPv6Address if ":" in host else IPv4Address
        addr = kind("TCP", host, next(_ports))
        self.proto: ServerProtocol = harness.factory.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)
        self.handshake = ClientHandshake(user_id, keys)
        # What every client accepts: a larger frame from the server fails the test.
        self.decoder = FrameDecoder(MAX_FRAME)
        self.session: Session | None = None
        self.lost = False

    def write(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def frames(self) -> list[Frame]:
        self.harness.clock.advance(0)
        data = self.transport.value()
        self.transport.clear()
        return self.decoder.feed(data)

    def login(self) -> list[InnerMessage]:
        """HELLO, WELCOME, a first sealed PING (the session goes live on it);
        returns what the server sent first, without the PONG."""
        self.welcome()
        self.send(Ping(LOGIN_NONCE))
        return [m for m in self.received() if m != Pong(LOGIN_NONCE)]

    def welcome(self) -> None:
        """HELLO and WELCOME only: the session keys exist, the session is not live."""
        self.write(self.handshake.hello_frame())
        frames = self.frames()
        assert frames and frames[0].type is FrameType.WELCOME, frames
        assert len(frames) == 1, frames
        self.session = Session(self.handshake.receive_welcome(frames[0].payload), "client", 65536)

    def outer_error(self) -> tuple[int, str]:
        (frame,) = self.frames()
        assert frame.type is FrameType.ERROR
        assert self.transport.disconnecting
        return decode_error(frame.payload)

    def _open(self, frames: list[Frame]) -> list[InnerMessage]:
        assert self.session is not None
        out: list[InnerMessage] = []
        for frame in frames:
            assert frame.type is FrameType.SEALED, frame
            out += self.session.open(frame.payload)
        return out

    def received(self) -> list[InnerMessage]:
        return self._open(self.frames())

    def answer_pings(self, messages: list[InnerMessage]) -> list[InnerMessage]:
        """Answer the server's PINGs among ``messages`` (as a client does) and
        return the rest."""
        pings = [m for m in messages if isinstance(m, Ping)]
        if pings:
            self.send(*(Pong(p.nonce) for p in pings))
        return [m for m in messages if not isinstance(m, Ping)]

    def send(self, *messages: InnerMessage) -> None:
        assert self.session is not None
        self.write(self.session.seal(messages))

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The TCP connection goes away."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionDone()))
