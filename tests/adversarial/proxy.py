"""A man in the middle on loopback: every byte between client and daemon passes here.

:class:`Proxy` listens on a free port and opens one connection to the daemon
per client connection (a :class:`Pipe`).  Bytes are cut into whole frames
(``u32`` length prefix and body) in each direction, recorded in
``pipe.frames[direction]`` as they arrived, and handed to ``edit(pipe,
direction, index, raw)``, whose return value is forwarded instead: the raw
frame (default), ``b""`` to drop it, a changed frame, or several.  Tests can
also :meth:`Pipe.inject` bytes and :meth:`Pipe.cut` the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

C2S, S2C = "c2s", "s2c"
_PASS_THROUGH = 1 << 20  # a prefix this large is not a frame we cut: forward raw

Edit = Callable[["Pipe", str, int, bytes], bytes]


def keep(pipe: Pipe, direction: str, index: int, raw: bytes) -> bytes:
    return raw


class _Splitter:
    def __init__(self) -> None:
        self.buffer = b""
        self.raw = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.raw:
            return [data]
        self.buffer += data
        out = []
        while len(self.buffer) >= 4:
            (size,) = struct.unpack_from(">I", self.buffer)
            if size > _PASS_THROUGH:
                self.raw = True
                out.append(self.buffer)
                self.buffer = b""
                break
            if len(self.buffer) < 4 + size:
                break
            out.append(self.buffer[: 4 + size])
            self.buffer = self.buffer[4 + size :]
        return out


class Pipe:
    """One client connection and its twin to the daemon."""

    def __init__(self, proxy: Proxy, client: Protocol) -> None:
        self.proxy = proxy
        self.index = len(proxy.pipes)
        self.client = client
        self.server: Protocol | None = None
        self.frames: dict[str, list[bytes]] = {C2S: [], S2C: []}
        self._split = {C2S: _Splitter(), S2C: _Splitter()}
        self._lost: set[str] = set()
        self.closed: Deferred[None] = Deferred()

    def received(self, direction: str, data: bytes) -> None:
        for raw in self._split[direction].feed(data):
            index = len(self.frames[direction])
            self.frames[direction].append(raw)
            out = self.proxy.edit(self, direction, index, raw)
            if out:
                self.inject(direction, out)

    def inject(self, direction: str, data: bytes) -> None:
        """Write ``data`` toward the daemon (C2S) or toward the client (S2C)."""
        target = self.server if direction == C2S else self.client
        if target is not None and target.transport is not None:
            target.transport.write(data)

    def cut(self) -> None:
        """Close both sides (after what was already written)."""
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.loseConnection()

    def lost(self, side: str) -> None:
        self._lost.add(side)
        self.cut()
        if self._lost == {"client", "server"} and not self.closed.called:
            self.closed.callback(None)


class _ToDaemon(Protocol):
    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def dataReceived(self, data: bytes) -> None:
        self.pipe.received(S2C, data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.pipe.lost("server")


class _FromClient(Protocol):
    pipe: Pipe

    def connectionMade(self) -> None:
        proxy: Proxy = self.factory.proxy  # type: ignore[attr-defined]
        self.pipe = Pipe(proxy, self)
        proxy.pipes.append(self.pipe)
        assert self.transport is not None
        self.transport.pauseProducing()
        to_daemon = _ToDaemon(self.pipe)
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", proxy.target_port, bindAddress=(proxy.source, 0)
        )

        def connected(protocol: _ToDaemon) -> None:
            self.pipe.server = protocol
            if self.transport is not None:
                self.transport.resumeProducing()

        def failed(_: Failure) -> None:
            self.pipe.lost("server")

        connectProtocol(endpoint, to_daemon).addCallbacks(connected, failed)

    def dataReceived(self, data: bytes) -> None:
        self.pipe.received(C2S, data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.pipe.lost("client")


class Proxy:
    """Listen on 127.0.0.1, forward to ``target_port`` through ``edit``."""

    def __init__(self, target_port: int, edit: Edit = keep) -> None:
        self.target_port = target_port
        self.edit = edit
        self.source = "127.0.0.1"  # the address the daemon sees (any 127.x works)
        self.pipes: list[Pipe] = []
        self._port: Any = None

    async def listen(self) -> int:
        factory = Factory.forProtocol(_FromClient)
        factory.proxy = self  # type: ignore[attr-defined]
        self._port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return int(self._port.getHost().port)

    @property
    def port(self) -> int:
        return int(self._port.getHost().port)

    async def close(self) -> None:
        for pipe in self.pipes:
            pipe.cut()
        for pipe in self.pipes:
            try:
                await pipe.closed.addTimeout(10, reactor)
            except defer.TimeoutError:
                for side in (pipe.client, pipe.server):
                    if side is not None and side.transport is not None:
                        side.transport.abortConnection()  # type: ignore[attr-defined]
        await self._port.stopListening()
