"""How the server closes, over real sockets: FIN and linger, with few lingering at once."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import task, threads

from enclaves.frames import ErrorCode, FrameDecoder, FrameType, decode_error
from enclaves.server.protocol import ServerFactory
from enclaves.server.router import Router
from enclaves.storage.memory import MemoryStorage


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = bytearray()
    while chunk := sock.recv(4096):
        data += chunk
    return bytes(data)


@pytest_twisted.ensureDeferred
async def test_refused_connections_linger_but_only_a_few_at_once() -> None:
    """Two connections beyond the limit whose peers never close: both hear
    SERVER_BUSY and a clean end of stream; only ``max_lingering`` (1) of them
    stays open waiting for its peer, the other is closed at once.  The
    lingering one goes as soon as its peer closes."""
    from twisted.internet import reactor

    storage = MemoryStorage()
    factory = ServerFactory(Router(storage, reactor), storage, reactor, max_connections=1)
    factory.max_lingering = 1
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    address = ("127.0.0.1", port.getHost().port)
    socks = []
    try:
        socks.append(socket.create_connection(address))  # holds the one slot
        for _ in range(50):
            if factory.protocols:
                break
            await task.deferLater(reactor, 0.02)
        refused = [socket.create_connection(address) for _ in range(2)]
        socks += refused
        for sock in refused:
            sock.sendall(b"\x00" * 10)  # unread input, as a HELLO would be
        for sock in refused:
            data = await threads.deferToThread(_read_to_eof, sock)
            (frame,) = FrameDecoder().feed(data)
            assert frame.type is FrameType.ERROR
            assert decode_error(frame.payload)[0] == ErrorCode.SERVER_BUSY
        assert len(factory.lingering) == 1 and len(factory.protocols) == 1
        (lingering,) = factory.lingering
        refused[0].close()
        refused[1].close()
        for _ in range(100):
            if not factory.lingering:
                break
            await task.deferLater(reactor, 0.02)
        assert not factory.lingering
        assert lingering.transport is None or not lingering.transport.connected
    finally:
        for sock in socks:
            sock.close()
        await port.stopListening()


def test_a_close_that_cannot_linger_still_ends_within_the_linger_time() -> None:
    """TLS transports (here a test transport: neither lingers) and closes beyond
    max_lingering just close, keeping their connection slot; if the client never
    reads what is still buffered, the connection is aborted after LINGER_SECONDS."""
    from enclaves.inner import Error, Ping
    from enclaves.transport import LINGER_SECONDS
    from tests.server.harness import Harness

    h = Harness()
    client = h.raw(7, h.add_user(7))
    client.login()
    client.send(Ping(1))
    client.write(b"\x00\x00\x00\x02\x01\x77")  # an unknown frame type: the session ends
    assert any(isinstance(m, Error) for m in client.received())
    assert client.transport.disconnecting and not client.transport.disconnected
    assert client.proto in h.factory.protocols  # still counted: it does not linger
    h.clock.advance(LINGER_SECONDS - 0.01)
    assert not client.transport.disconnected
    h.clock.advance(0.01)
    assert client.transport.disconnected  # aborted


def test_one_session_failing_to_flush_does_not_stall_the_others() -> None:
    """Output is flushed for all sessions in one call per reactor turn: a bug
    in one session's flush ends that session, and the others still get theirs."""
    from enclaves.inner import Deliver, Send
    from tests.server.harness import Harness

    h = Harness()
    a, b, c = (h.raw(uid, h.add_user(uid)) for uid in (1, 2, 3))
    for client in (a, b, c):
        client.login()

    def broken() -> None:
        raise RuntimeError("a bug")

    a.proto._flush = broken  # type: ignore[method-assign]
    c.send(Send(b"\x01" * 16, 1, b"to a"), Send(b"\x02" * 16, 2, b"to b"))
    assert [m for m in b.received() if isinstance(m, Deliver)] == [
        Deliver(b"\x02" * 16, 3, b"to b")
    ]
    assert a.transport.disconnecting
