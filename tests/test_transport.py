"""enclaves.transport over real loopback sockets: writes at once, in order, closes without RST."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest_twisted
from twisted.internet import protocol, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport

from enclaves.transport import LINGER_SECONDS, close_after_output, write_now


class Collect(protocol.Protocol):
    """Keeps what it reads; ``closed`` fires with the reason at connectionLost."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[Any] = Deferred()
        self.made: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.closed.callback(None)


async def _wait(predicate: Any, what: str, limit: float = 10.0) -> None:
    from twisted.internet import reactor

    for _ in range(int(limit / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _pair() -> tuple[Collect, Collect, Any]:
    """A connected (client, server) pair of Collect protocols on 127.0.0.1."""
    from twisted.internet import reactor

    servers: list[Collect] = []
    factory = protocol.Factory.forProtocol(lambda: servers.append(Collect()) or servers[-1])
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    client = await connectProtocol(endpoint, Collect())
    await _wait(lambda: servers, "the server side")
    await servers[0].made
    return client, servers[0], port


@pytest_twisted.ensureDeferred
async def test_write_now_sends_at_once_on_an_idle_socket() -> None:
    from twisted.internet import reactor

    client, server, port = await _pair()
    try:
        write_now(client.transport, b"hello")
        # Nothing left in Twisted's buffer, and no wake-up for writability asked.
        assert client.transport._tempDataLen == 0  # type: ignore[union-attr]
        assert client.transport not in reactor.getWriters()  # type: ignore[attr-defined]
        await _wait(lambda: bytes(server.received) == b"hello", "the bytes")
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_write_now_queues_behind_bytes_twisted_still_holds() -> None:
    """With the peer not reading, the socket fills and Twisted buffers; later
    write_now calls must queue behind that data, never jump ahead of it."""
    client, server, port = await _pair()
    try:
        server.transport.pauseProducing()  # type: ignore[union-attr]
        sent = bytearray()
        chunk = bytes(range(256)) * 256  # 64 KiB
        for i in range(200):  # at most 12.8 MiB: far more than two socket buffers
            piece = bytes([i % 256]) + chunk
            write_now(client.transport, piece)
            sent += piece
            if client.transport._tempDataLen:  # type: ignore[union-attr]
                break
        assert client.transport._tempDataLen, "the socket never filled"  # type: ignore[union-attr]
        for i in range(50):
            piece = b"small %d;" % i
            write_now(client.transport, piece)
            sent += piece
        server.transport.resumeProducing()  # type: ignore[union-attr]
        await _wait(lambda: len(server.received) >= len(sent), "all bytes", limit=30)
        assert server.received == sent
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await port.stopListening()


def test_other_transports_get_a_plain_write_and_close() -> None:
    transport = StringTransport()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"
    assert close_after_output(transport, task.Clock()) is None
    assert transport.disconnecting


def _peer_that_sends_then_reads_to_the_end(port: int) -> tuple[bytes, str]:
    """Blocking client: send at once, read only once the server has closed its side."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"x" * 4096)  # left unread by the server
        time.sleep(0.6)  # the server replies and closes 0.2 s after accepting
        got = bytearray()
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            return bytes(got), "reset"
        return bytes(got), "clean"


class ReplyAndClose(protocol.Protocol):
    """Never reads; after a moment writes a reply and closes with close_after_output."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.closed: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        from twisted.internet import reactor

        self.transport.pauseProducing()  # type: ignore[union-attr]
        reactor.callLater(0.2, self.reply)  # the peer's bytes are here by then

    def reply(self) -> None:
        write_now(self.transport, b"the reason")
        self.linger = close_after_output(self.transport, self.clock)

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.closed.callback(None)


async def _serve_one(clock: Any) -> tuple[tuple[bytes, str], ReplyAndClose]:
    from twisted.internet import reactor

    made: list[ReplyAndClose] = []
    factory = protocol.Factory.forProtocol(lambda: made.append(ReplyAndClose(clock)) or made[-1])
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        result = await threads.deferToThread(
            _peer_that_sends_then_reads_to_the_end, port.getHost().port
        )
    finally:
        await port.stopListening()
    return result, made[0]


@pytest_twisted.ensureDeferred
async def test_close_after_output_ends_cleanly_with_input_unread() -> None:
    """The peer reads the reply and a clean end of stream; the server, which
    never reads, cannot see the peer's close, so the linger timer ends it."""
    clock = task.Clock()
    (got, end), server = await _serve_one(clock)
    assert (got, end) == (b"the reason", "clean")
    assert not server.closed.called
    clock.advance(LINGER_SECONDS)
    await server.closed


@pytest_twisted.ensureDeferred
async def test_a_lingering_socket_closes_when_the_peer_does() -> None:
    """A reading server sees the peer's close at once; the timer is then moot."""
    client, server, port = await _pair()
    try:
        clock = task.Clock()
        call = close_after_output(server.transport, clock)
        assert call is not None and call.active()
        await _wait(lambda: client.closed.called, "the client to see EOF")
        await server.closed
        assert bytes(client.received) == b""
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_the_twisted_internals_it_relies_on_write_now_just_writes(
    monkeypatch: Any,
) -> None:
    """A Twisted lacking the FileDescriptor attributes write_now reads gets
    plain buffered writes (checked once at import), never an AttributeError."""
    from twisted.internet import reactor

    import enclaves.transport

    monkeypatch.setattr(enclaves.transport, "_FAST", False)
    client, server, port = await _pair()
    try:
        write_now(client.transport, b"buffered")
        assert client.transport in reactor.getWriters()  # type: ignore[attr-defined]
        await _wait(lambda: bytes(server.received) == b"buffered", "the bytes")
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await port.stopListening()


def _nodelay(transport: Any) -> int:
    return int(transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest_twisted.ensureDeferred
async def test_server_and_client_sockets_do_not_wait_for_nagle() -> None:
    """Both ends coalesce whole frames themselves: the kernel must not hold a
    frame back waiting for the ACK of the previous one (Nagle)."""
    from twisted.internet import reactor

    from enclaves.client.connection import ClientConnection
    from enclaves.crypto import KeyPair
    from enclaves.server.protocol import ServerFactory
    from enclaves.server.router import Router
    from enclaves.storage.memory import MemoryStorage

    storage = MemoryStorage()
    factory = ServerFactory(Router(storage, reactor), storage, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    client = await connectProtocol(endpoint, ClientConnection(7, KeyPair.generate()))
    try:
        await _wait(lambda: factory.protocols, "the server side")
        (server,) = factory.protocols
        assert _nodelay(server.transport) and _nodelay(client.transport)
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        client.ready.addErrback(lambda _: None)
        await port.stopListening()
