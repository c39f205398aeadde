"""Output backpressure over a real socket: a client that floods and never reads."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest_twisted
from twisted.internet import threads

from enclaves.crypto import KeyPair
from enclaves.frames import FrameDecoder, FrameType
from enclaves.handshake import ClientHandshake
from enclaves.inner import Ping
from enclaves.server.protocol import ServerFactory
from enclaves.server.router import Router
from enclaves.session import Session
from enclaves.storage.memory import MemoryStorage

FLOOD_LIMIT = 48 * 1024 * 1024  # bytes the flooder tries to send at most
PINGS_PER_FRAME = 4000  # about 52 KB per sealed frame


def _buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds, not yet written to the socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_flooding_client_that_never_reads_keeps_server_buffer_bounded() -> None:
    from twisted.internet import reactor

    storage = MemoryStorage()
    keys = KeyPair.generate()
    storage.add_user(5, keys, None)
    factory = ServerFactory(Router(storage, reactor), storage, reactor, idle_timeout=2)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    def server_buffer() -> int:
        (protocol,) = factory.protocols
        return _buffered(protocol.transport)

    seen: list[Any] = []

    def connections() -> int:
        """Server connections whose socket is still open (counted or not)."""
        seen.extend(p for p in factory.protocols if p not in seen)
        return sum(1 for p in seen if p.transport is not None and p.transport.connected)

    def flooder() -> tuple[int, int, int]:
        handshake = ClientHandshake(5, keys)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(10)
        with sock:
            sock.connect(("127.0.0.1", port.getHost().port))
            sock.sendall(handshake.hello_frame())
            frames: list = []  # type: ignore[type-arg]
            decoder = FrameDecoder()
            while not frames:
                frames += decoder.feed(sock.recv(4096))
            assert frames[0].type is FrameType.WELCOME
            session = Session(handshake.receive_welcome(frames[0].payload), "client", 65536)
            sock.settimeout(1.0)  # a send blocked this long: the server stopped reading
            sent = 0
            try:
                while sent < FLOOD_LIMIT:
                    frame = session.seal([Ping(i) for i in range(PINGS_PER_FRAME)])
                    sock.sendall(frame)
                    sent += len(frame)
            except TimeoutError:
                pass
            buffered = threads.blockingCallFromThread(reactor, server_buffer)
            # Still not reading: the idle timeout must end the connection even
            # though its output can never be flushed.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if threads.blockingCallFromThread(reactor, connections) == 0:
                    break
                time.sleep(0.1)
            return sent, buffered, threads.blockingCallFromThread(reactor, connections)

    try:
        sent, buffered, left = await threads.deferToThread(flooder)
    finally:
        await port.stopListening()
        for protocol in list(factory.protocols) + seen:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()
    assert sent < FLOOD_LIMIT, "the server kept reading a client that never reads"
    assert buffered < 1024 * 1024, buffered
    assert left == 0, "a client that never reads kept its connection past the idle timeout"
