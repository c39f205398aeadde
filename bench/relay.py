"""Baseline relays for bench/routing.py: same framing and inner codec, no sessions.

``bare``: the ceiling.  Frames carry plain inner messages, no crypto at all,
and the output is coalesced as Enclaves coalesces it: a read's DELIVERs to
one receiver go out as one frame, written at once (``write_now``).  What
Enclaves adds to it is the cost of its crypto, receipts and guarantees.
``naive``: every frame is sealed and opened one by one (no coalescing), with
fixed per-user keys instead of a handshake, and plain buffered writes.  Both
start with a login frame carrying the user id.  Run:
``python -m bench.relay MODE PORT``.
"""

from __future__ import annotations

import struct
import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from enclaves import inner
from enclaves.crypto import KeyPair, sha256
from enclaves.frames import MAX_FRAME, FrameDecoder, FrameType, encode_frame
from enclaves.handshake import SessionKeys
from enclaves.session import Session
from enclaves.transport import write_now

_LIMIT = MAX_FRAME - 2  # the most inner bytes one frame carries


def bench_keys(user_id: int) -> SessionKeys:
    """Fixed session keys for a baseline connection (no handshake)."""
    seed = struct.pack(">Q", user_id)
    return SessionKeys(
        KeyPair(sha256(b"c2s.enc", seed), sha256(b"c2s.auth", seed)),
        KeyPair(sha256(b"s2c.enc", seed), sha256(b"s2c.auth", seed)),
    )


class RelayProtocol(Protocol):
    factory: RelayFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # as the Enclaves server does
        self.decoder = FrameDecoder(MAX_FRAME)
        self.user_id = 0
        self.session: Session | None = None
        self.queue: list[bytes] = []  # bare: encoded DELIVERs of the read under way

    def dataReceived(self, data: bytes) -> None:
        online = self.factory.online
        targets: list[RelayProtocol] = []  # bare: receivers with a queue to write
        for frame in self.decoder.feed(data):
            if self.user_id == 0:
                (self.user_id,) = struct.unpack(">Q", frame.payload)
                online[self.user_id] = self
                if self.factory.mode == "naive":
                    self.session = Session(bench_keys(self.user_id), "server", MAX_FRAME)
                continue
            if self.session is not None:
                for message in self.session.open(frame.payload):
                    if isinstance(message, inner.Send):
                        target = online.get(message.recipient)
                        if target is not None:
                            deliver = inner.Deliver(message.msg_id, self.user_id, message.blob)
                            target.deliver(deliver)
                continue
            for item in inner.decode_routed(frame.payload):
                if type(item) is tuple:  # SEND: (msg_id, recipient, blob)
                    msg_id, recipient, blob = item
                    target = online.get(recipient)
                    if target is not None:
                        if not target.queue:
                            targets.append(target)
                        target.queue.append(inner.encoded_deliver(msg_id, self.user_id, blob))
        for target in targets:
            target.write_queue()

    def deliver(self, message: inner.Deliver) -> None:
        """Naive: one DELIVER, sealed alone."""
        assert self.session is not None
        self.transport.write(self.session.seal([message]))

    def write_queue(self) -> None:
        """Bare: the queued DELIVERs in as few frames as fit, written now."""
        queue, self.queue = self.queue, []
        chunk: list[bytes] = []
        size = 0
        out = []
        for raw in queue:
            if size + len(raw) > _LIMIT:
                out.append(encode_frame(FrameType.SEALED, b"".join(chunk)))
                chunk, size = [], 0
            chunk.append(raw)
            size += len(raw)
        out.append(encode_frame(FrameType.SEALED, b"".join(chunk)))
        if self.transport is not None:
            write_now(self.transport, b"".join(out))

    def connectionLost(self, reason: object = None) -> None:
        if self.factory.online.get(self.user_id) is self:
            del self.factory.online[self.user_id]


class RelayFactory(Factory):
    protocol = RelayProtocol
    noisy = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.online: dict[int, RelayProtocol] = {}


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    reactor.listenTCP(port, RelayFactory(mode), interface="127.0.0.1")  # type: ignore[attr-defined]
    print("listening", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
