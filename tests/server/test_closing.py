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
